"""The parts FLA's causal LMs share, in `jax.numpy`: linear layers, RMSNorm, short convolutions, the SwiGLU
MLP, and the pre-norm decoder (embedding, blocks of mixer + MLP, final norm, LM head).

A family module supplies only its mixer (``mixer(params, prefix, config, x) -> y`` on one sequence ``[T, D]``);
parameters are read by their torch state_dict names, as a flame_gin checkpoint's PyTree holds them.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def linear(params: dict, name: str, x: jax.Array) -> jax.Array:
    y = x @ params[f"{name}.weight"].T
    bias = params.get(f"{name}.bias")
    return y if bias is None else y + bias


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """RMSNorm in float32 (as FLA's fused kernels compute it); the caller casts back."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y if weight is None else y * weight


def short_conv(params: dict, name: str, x: jax.Array, *, activation: bool = True) -> jax.Array:
    """FLA's ShortConvolution: causal depthwise convolution over time ([T, D] -> [T, D]), then SiLU."""
    weight = params[f"{name}.weight"][:, 0, :]  # [D, K]
    size = weight.shape[-1]
    padded = jnp.pad(x, ((size - 1, 0), (0, 0)))
    y = sum(padded[i : i + x.shape[0]] * weight[:, i] for i in range(size))
    bias = params.get(f"{name}.bias")
    if bias is not None:
        y = y + bias
    return jax.nn.silu(y) if activation else y


def mlp(params: dict, prefix: str, x: jax.Array) -> jax.Array:
    """FLA's GatedMLP with the swish activation: down(silu(gate(x)) * up(x))."""
    gate = linear(params, f"{prefix}.gate_proj", x)
    up = linear(params, f"{prefix}.up_proj", x)
    return linear(params, f"{prefix}.down_proj", jax.nn.silu(gate) * up)


def refuse(family: str, unsupported: dict[str, bool]) -> None:
    """Raise, naming every option set in ``unsupported`` (name -> is set)."""
    bad = [name for name, is_set in unsupported.items() if is_set]
    if bad:
        raise NotImplementedError(f"flame_gin.jax: {family} with {', '.join(bad)} is not implemented")


def causal_lm_logits(*, params: dict, config: dict, tokens, mixer: Callable) -> jax.Array:
    """Float32 logits [B, T, vocab] of the pre-norm decoder around ``mixer``."""
    eps = config["norm_eps"]

    def one(seq):
        h = params["model.embeddings.weight"][seq]
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}"
            h = h + mixer(
                params, f"{p}.attn", config, rms_norm(h, params[f"{p}.attn_norm.weight"], eps).astype(h.dtype)
            )
            h = h + mlp(params, f"{p}.mlp", rms_norm(h, params[f"{p}.mlp_norm.weight"], eps).astype(h.dtype))
        h = rms_norm(h, params["model.norm.weight"], eps).astype(h.dtype)
        head = params.get("lm_head.weight", params["model.embeddings.weight"])
        return (h @ head.T).astype(jnp.float32)

    return jax.vmap(one)(jnp.asarray(tokens))
