"""The DeltaNet language model's forward pass in `jax.numpy`, from a restored checkpoint tree.

FLA's `DeltaNet` layer in its recurrent form (`jax.lax.scan` over time), the delta rule with L2-normalised
queries and keys (FLA's default ``qk_norm='l2'``, eps 1e-6 inside the square root):

    S_t = S_{t-1} + beta_t k_t^T (v_t - k_t S_{t-1}),   o_t = (q_t / sqrt(d_k)) S_t

which FLA's chunked kernels compute in WY form. Plain and exact, for using trained weights in JAX.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flame_gin.jax import layers

L2_EPS = 1e-6


def _l2_normalise(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2_EPS)


def _recurrence(q, k, v, beta):
    """The delta rule over one sequence; q, k: [T, H, K], v: [T, H, V], beta: [T, H]."""
    scale = q.shape[-1] ** -0.5

    def step(state, inputs):
        q_t, k_t, v_t, b_t = inputs
        error = (v_t - jnp.einsum("hk,hkv->hv", k_t, state)) * b_t[:, None]
        state = state + k_t[..., None] * error[:, None, :]
        return state, jnp.einsum("hk,hkv->hv", q_t * scale, state)

    heads, dk, dv = q.shape[1], q.shape[2], v.shape[2]
    _, out = jax.lax.scan(step, jnp.zeros((heads, dk, dv), jnp.float32), (q, k, v, beta))
    return out


def mixer(params: dict, prefix: str, config: dict, x: jax.Array) -> jax.Array:
    """One DeltaNet layer on one sequence x: [T, D]."""
    heads, steps = config["num_heads"], x.shape[0]
    silu_qk = config.get("qk_activation", "silu") == "silu"
    q = layers.linear(params, f"{prefix}.q_proj", x)
    k = layers.linear(params, f"{prefix}.k_proj", x)
    v = layers.linear(params, f"{prefix}.v_proj", x)
    if config.get("use_short_conv", True):
        q = layers.short_conv(params, f"{prefix}.q_conv1d", q, activation=silu_qk)
        k = layers.short_conv(params, f"{prefix}.k_conv1d", k, activation=silu_qk)
        v = layers.short_conv(params, f"{prefix}.v_conv1d", v)
    else:
        q, k = (jax.nn.silu(q), jax.nn.silu(k)) if silu_qk else (q, k)
        v = jax.nn.silu(v)
    dk, dv = q.shape[-1] // heads, v.shape[-1] // heads
    q, k = (_l2_normalise(t.reshape(steps, heads, dk).astype(jnp.float32)) for t in (q, k))
    v = v.reshape(steps, heads, dv).astype(jnp.float32)
    if config.get("use_beta", True):
        beta = jax.nn.sigmoid(layers.linear(params, f"{prefix}.b_proj", x).astype(jnp.float32))
    else:
        beta = jnp.ones((steps, heads), jnp.float32)
    if config.get("allow_neg_eigval"):
        beta = beta * 2.0
    o = layers.rms_norm(_recurrence(q, k, v, beta), params.get(f"{prefix}.o_norm.weight"), config["norm_eps"])
    return layers.linear(params, f"{prefix}.o_proj", o.reshape(steps, heads * dv).astype(x.dtype))


def check_config(config: dict) -> None:
    """Refuse, by name, the DeltaNet options this forward does not implement."""
    layers.refuse(
        "DeltaNet",
        {
            "qk_activation": config.get("qk_activation", "silu") not in ("silu", "identity"),
            "qk_norm": config.get("qk_norm", "l2") != "l2",
            "use_gate": bool(config.get("use_gate")),
            "attn (hybrid softmax layers)": bool(config.get("attn")),
            "hidden_act": config.get("hidden_act", "swish") not in ("swish", "silu"),
        },
    )


def logits(*, params: dict, config: dict, tokens) -> jax.Array:
    """Logits [B, T, vocab] (float32) of token ids [B, T]."""
    check_config(config)
    return layers.causal_lm_logits(params=params, config=config, tokens=tokens, mixer=mixer)
