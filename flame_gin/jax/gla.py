"""The GLA language model's forward pass in `jax.numpy`, from a restored checkpoint tree.

Written by hand because no JAX library carries FLA's models. It follows FLA's
`GLAForCausalLM` (pre-norm blocks of gated linear attention and a SwiGLU MLP)
in its recurrent form, `jax.lax.scan` over time:

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,   o_t = (q_t / sqrt(d_k)) S_t

with g = logsigmoid(low-rank gate) / 16, which is what FLA's chunked Triton
kernels compute blockwise. The scan is exact and plain; it is meant for
checking and using trained weights in JAX, not for training speed.

Parameters are read by their torch state_dict names (the names a flame_gin
checkpoint's PyTree uses), so a restored tree needs no renaming.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GATE_LOGIT_NORMALIZER = 16.0


def _linear(params: dict, name: str, x: jax.Array) -> jax.Array:
    y = x @ params[f"{name}.weight"].T
    bias = params.get(f"{name}.bias")
    return y if bias is None else y + bias


def _rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y if weight is None else y * weight


def _short_conv(params: dict, name: str, x: jax.Array) -> jax.Array:
    """Causal depthwise convolution over time, then SiLU ([T, D] -> [T, D])."""
    weight = params[f"{name}.weight"][:, 0, :]  # [D, K]
    size = weight.shape[-1]
    padded = jnp.pad(x, ((size - 1, 0), (0, 0)))
    y = sum(padded[i : i + x.shape[0]] * weight[:, i] for i in range(size))
    bias = params.get(f"{name}.bias")
    if bias is not None:
        y = y + bias
    return jax.nn.silu(y)


def _recurrence(q, k, v, g):
    """Gated linear attention over one sequence; q, k, g: [T, H, K], v: [T, H, V]."""
    scale = q.shape[-1] ** -0.5

    def step(state, inputs):
        q_t, k_t, v_t, g_t = inputs
        state = jnp.exp(g_t)[..., None] * state + k_t[..., None] * v_t[:, None, :]
        return state, jnp.einsum("hk,hkv->hv", q_t * scale, state)

    heads, dk, dv = q.shape[1], q.shape[2], v.shape[2]
    init = jnp.zeros((heads, dk, dv), jnp.float32)
    _, out = jax.lax.scan(step, init, (q, k, v, g))
    return out


def _attention(params: dict, prefix: str, config: dict, x: jax.Array) -> jax.Array:
    """One GatedLinearAttention layer on one sequence x: [T, D]."""
    heads = config["num_heads"]
    kv_heads = config.get("num_kv_heads") or heads
    q = _linear(params, f"{prefix}.q_proj", x)
    k = _linear(params, f"{prefix}.k_proj", x)
    v = _linear(params, f"{prefix}.v_proj", x)
    if config.get("use_short_conv"):
        q = _short_conv(params, f"{prefix}.q_conv1d", q)
        k = _short_conv(params, f"{prefix}.k_conv1d", k)
        v = _short_conv(params, f"{prefix}.v_conv1d", v)
    g = _linear(params, f"{prefix}.gk_proj.1", _linear(params, f"{prefix}.gk_proj.0", x))
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
        gate = _linear(params, f"{prefix}.g_proj", x).reshape(steps, heads, dv)
        norm = "g_norm_swish_gate" if config.get("fuse_norm", True) else "g_norm"
        o = _rms_norm(o, params.get(f"{prefix}.{norm}.weight"), eps) * jax.nn.silu(gate)
    else:
        o = _rms_norm(o, params.get(f"{prefix}.g_norm.weight"), eps)
    return _linear(params, f"{prefix}.o_proj", o.reshape(steps, heads * dv).astype(x.dtype))


def _mlp(params: dict, prefix: str, x: jax.Array) -> jax.Array:
    gate = _linear(params, f"{prefix}.gate_proj", x)
    up = _linear(params, f"{prefix}.up_proj", x)
    return _linear(params, f"{prefix}.down_proj", jax.nn.silu(gate) * up)


def check_config(config: dict) -> None:
    """Refuse, by name, the GLA options this forward does not implement."""
    unsupported = {
        "feature_map": config.get("feature_map") is not None,
        "attnres_block_size": config.get("attnres_block_size") is not None,
        "attn (hybrid softmax layers)": bool(config.get("attn")),
        "hidden_act": config.get("hidden_act", "swish") not in ("swish", "silu"),
        "use_gv": bool(config.get("use_gv")),
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise NotImplementedError(f"flame_gin.jax: GLA with {', '.join(bad)} is not implemented")


def logits(*, params: dict, config: dict, tokens: jax.Array) -> jax.Array:
    """Logits [B, T, vocab] (float32) of token ids [B, T]."""
    check_config(config)
    eps = config["norm_eps"]

    def one(seq):
        h = params["model.embeddings.weight"][seq]
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}"
            h = h + _attention(params, f"{p}.attn", config, _rms_norm(h, params[f"{p}.attn_norm.weight"], eps).astype(h.dtype))
            h = h + _mlp(params, f"{p}.mlp", _rms_norm(h, params[f"{p}.mlp_norm.weight"], eps).astype(h.dtype))
        h = _rms_norm(h, params["model.norm.weight"], eps).astype(h.dtype)
        head = params.get("lm_head.weight", params["model.embeddings.weight"])
        return (h @ head.T).astype(jnp.float32)

    return jax.vmap(one)(jnp.asarray(tokens))
