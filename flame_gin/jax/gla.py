"""The GLA language model's forward pass in `jax.numpy`, from a restored checkpoint tree.

Written by hand because no JAX library carries FLA's models. It follows FLA's `GatedLinearAttention` in its
recurrent form, `jax.lax.scan` over time:

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,   o_t = (q_t / sqrt(d_k)) S_t

with g = logsigmoid(low-rank gate) / 16, which is what FLA's chunked Triton kernels compute blockwise. The scan
is exact and plain; it is meant for checking and using trained weights in JAX, not for training speed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flame_gin.jax import layers

GATE_LOGIT_NORMALIZER = 16.0


def _recurrence(q, k, v, g):
    """Gated linear attention over one sequence; q, k, g: [T, H, K], v: [T, H, V]."""
    scale = q.shape[-1] ** -0.5

    def step(state, inputs):
        q_t, k_t, v_t, g_t = inputs
        state = jnp.exp(g_t)[..., None] * state + k_t[..., None] * v_t[:, None, :]
        return state, jnp.einsum("hk,hkv->hv", q_t * scale, state)

    heads, dk, dv = q.shape[1], q.shape[2], v.shape[2]
    _, out = jax.lax.scan(step, jnp.zeros((heads, dk, dv), jnp.float32), (q, k, v, g))
    return out


def mixer(params: dict, prefix: str, config: dict, x: jax.Array) -> jax.Array:
    """One GatedLinearAttention layer on one sequence x: [T, D]."""
    heads = config["num_heads"]
    kv_heads = config.get("num_kv_heads") or heads
    q = layers.linear(params, f"{prefix}.q_proj", x)
    k = layers.linear(params, f"{prefix}.k_proj", x)
    v = layers.linear(params, f"{prefix}.v_proj", x)
    if config.get("use_short_conv"):
        q = layers.short_conv(params, f"{prefix}.q_conv1d", q)
        k = layers.short_conv(params, f"{prefix}.k_conv1d", k)
        v = layers.short_conv(params, f"{prefix}.v_conv1d", v)
    g = layers.linear(params, f"{prefix}.gk_proj.1", layers.linear(params, f"{prefix}.gk_proj.0", x))
    steps = x.shape[0]
    dk, dv = q.shape[-1] // heads, v.shape[-1] // kv_heads
    q = q.reshape(steps, heads, dk)
    k, g = (jnp.repeat(t.reshape(steps, kv_heads, dk), heads // kv_heads, axis=1) for t in (k, g))
    v = jnp.repeat(v.reshape(steps, kv_heads, dv), heads // kv_heads, axis=1)
    g = jax.nn.log_sigmoid(g.astype(jnp.float32)) / GATE_LOGIT_NORMALIZER
    if config.get("clamp_min") is not None:
        g = jnp.maximum(g, config["clamp_min"])
    o = _recurrence(*(t.astype(jnp.float32) for t in (q, k, v)), g)
    eps = config["norm_eps"]
    if config.get("use_output_gate", True):
        gate = layers.linear(params, f"{prefix}.g_proj", x).reshape(steps, heads, dv)
        norm = "g_norm_swish_gate" if config.get("fuse_norm", True) else "g_norm"
        o = layers.rms_norm(o, params.get(f"{prefix}.{norm}.weight"), eps) * jax.nn.silu(gate)
    else:
        o = layers.rms_norm(o, params.get(f"{prefix}.g_norm.weight"), eps)
    return layers.linear(params, f"{prefix}.o_proj", o.reshape(steps, heads * dv).astype(x.dtype))


def check_config(config: dict) -> None:
    """Refuse, by name, the GLA options this forward does not implement."""
    layers.refuse(
        "GLA",
        {
            "feature_map": config.get("feature_map") is not None,
            "attnres_block_size": config.get("attnres_block_size") is not None,
            "attn (hybrid softmax layers)": bool(config.get("attn")),
            "hidden_act": config.get("hidden_act", "swish") not in ("swish", "silu"),
            "use_gv": bool(config.get("use_gv")),
        },
    )


def logits(*, params: dict, config: dict, tokens) -> jax.Array:
    """Logits [B, T, vocab] (float32) of token ids [B, T]."""
    check_config(config)
    return layers.causal_lm_logits(params=params, config=config, tokens=tokens, mixer=mixer)
