"""Pure-PyTorch normalisation ops with the signatures of FLA 0.6's Triton-backed norm functions.

FLA's `RMSNorm`, `LayerNorm`, `GroupNorm`, `FusedRMSNormGated`, `FusedLayerNormGated` and `L2Norm`
modules call module-level functions (`rms_norm`, `layer_norm`, `group_norm`, `rms_norm_gated`,
`layer_norm_gated`, `l2norm`) that launch Triton kernels. These equivalents compute in float32,
return the input dtype, and follow FLA's prenorm convention: with `prenorm=True` they also return the
residual stream `x + residual` (kept in float32 when `residual_in_fp32` and no residual dtype is given).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _normalize(*, x, weight, bias, eps, is_rms_norm, num_groups=1):
    """Row-wise (or group-wise) layer/RMS normalisation of float32 `x` with an optional affine."""
    shape = x.shape
    x = x.reshape(*shape[:-1], num_groups, shape[-1] // num_groups)
    if is_rms_norm:
        y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    else:
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).square().mean(-1, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + eps)
    y = y.reshape(shape)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y


def _with_residual(*, x, residual, residual_in_fp32):
    """Adds the residual in float32; returns (sum in float32, dtype in which FLA returns the residual stream)."""
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != input shape {tuple(x.shape)}")
        return x.float() + residual.float(), residual.dtype
    return x.float(), (torch.float32 if residual_in_fp32 else x.dtype)


def layer_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False, is_rms_norm=False):
    """Reference for `fla.modules.norm.layernorm.layer_norm`."""
    return group_norm(
        x=x,
        weight=weight,
        bias=bias,
        residual=residual,
        eps=eps,
        prenorm=prenorm,
        residual_in_fp32=residual_in_fp32,
        is_rms_norm=is_rms_norm,
        num_groups=1,
    )


def rms_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
    """Reference for `fla.modules.norm.layernorm.rms_norm`."""
    return group_norm(
        x=x,
        weight=weight,
        bias=bias,
        residual=residual,
        eps=eps,
        prenorm=prenorm,
        residual_in_fp32=residual_in_fp32,
        is_rms_norm=True,
        num_groups=1,
    )


def rms_norm_linear(
    x,
    norm_weight,
    norm_bias,
    linear_weight,
    linear_bias,
    residual=None,
    eps=1e-5,
    prenorm=False,
    residual_in_fp32=False,
):
    """Reference for `fla.modules.norm.layernorm.rms_norm_linear`: RMSNorm, then the linear layer."""
    out = rms_norm(
        x, norm_weight, norm_bias, residual=residual, eps=eps, prenorm=prenorm, residual_in_fp32=residual_in_fp32
    )
    normed, rest = (out[0], out[1:]) if prenorm else (out, ())
    y = torch.nn.functional.linear(normed.to(linear_weight.dtype), linear_weight, linear_bias)
    return (y, *rest) if prenorm else y


def rms_norm_swish_gate_linear(
    x,
    g,
    norm_weight,
    norm_bias,
    linear_weight,
    linear_bias,
    residual=None,
    prenorm=False,
    residual_in_fp32=False,
    eps=1e-6,
):
    """Reference for `fla.modules.norm.fused_norm_gate.rms_norm_swish_gate_linear`: rmsnorm(x) * swish(g), then
    the linear layer."""
    out = rms_norm_gated(
        x, g, norm_weight, norm_bias, residual=residual, prenorm=prenorm, residual_in_fp32=residual_in_fp32, eps=eps
    )
    normed, rest = (out[0], out[1:]) if prenorm else (out, ())
    y = torch.nn.functional.linear(normed.to(linear_weight.dtype), linear_weight, linear_bias)
    return (y, *rest) if prenorm else y


def group_norm(
    x,
    weight,
    bias,
    residual=None,
    eps=1e-5,
    prenorm=False,
    residual_in_fp32=False,
    is_rms_norm=False,
    num_groups=1,
):
    """Reference for `fla.modules.norm.layernorm.group_norm` (also the body of the two above)."""
    if x.shape[-1] % num_groups:
        raise ValueError(f"num_channels {x.shape[-1]} must be divisible by num_groups {num_groups}")
    stream, stream_dtype = _with_residual(x=x, residual=residual, residual_in_fp32=residual_in_fp32)
    y = _normalize(x=stream, weight=weight, bias=bias, eps=eps, is_rms_norm=is_rms_norm, num_groups=num_groups)
    y = y.to(x.dtype)
    return (y, stream.to(stream_dtype)) if prenorm else y


def _gate(*, g, activation):
    g = g.float()
    if activation in ("swish", "silu"):
        return F.silu(g)
    if activation == "sigmoid":
        return torch.sigmoid(g)
    raise ValueError(f"unsupported gate activation {activation!r} (expected swish, silu or sigmoid)")


def _norm_gated(*, x, g, weight, bias, activation, residual, eps, prenorm, residual_in_fp32, is_rms_norm):
    stream, stream_dtype = _with_residual(x=x, residual=residual, residual_in_fp32=residual_in_fp32)
    y = _normalize(x=stream, weight=weight, bias=bias, eps=eps, is_rms_norm=is_rms_norm)
    y = (y * _gate(g=g, activation=activation)).to(x.dtype)
    return (y, stream.to(stream_dtype)) if prenorm else y


def rms_norm_gated(
    x,
    g,
    weight,
    bias,
    activation="swish",
    residual=None,
    prenorm=False,
    residual_in_fp32=False,
    eps=1e-6,
):
    """Reference for `fla.modules.norm.fused_norm_gate.rms_norm_gated`: rmsnorm(x) * act(g)."""
    return _norm_gated(
        x=x,
        g=g,
        weight=weight,
        bias=bias,
        activation=activation,
        residual=residual,
        eps=eps,
        prenorm=prenorm,
        residual_in_fp32=residual_in_fp32,
        is_rms_norm=True,
    )


def layer_norm_gated(
    x,
    g,
    weight,
    bias,
    activation="swish",
    residual=None,
    prenorm=False,
    residual_in_fp32=False,
    eps=1e-6,
):
    """Reference for `fla.modules.norm.fused_norm_gate.layer_norm_gated`: layernorm(x) * act(g)."""
    return _norm_gated(
        x=x,
        g=g,
        weight=weight,
        bias=bias,
        activation=activation,
        residual=residual,
        eps=eps,
        prenorm=prenorm,
        residual_in_fp32=residual_in_fp32,
        is_rms_norm=False,
    )


def l2norm(x, eps=1e-6, output_dtype=None):
    """Reference for `fla.modules.norm.l2norm.l2norm`: x / sqrt(sum(x^2) + eps) over the last dim."""
    y = x.float() * torch.rsqrt(x.float().square().sum(-1, keepdim=True) + eps)
    return y.to(x.dtype if output_dtype is None else output_dtype)


def gated_group_rms_norm(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True, **unused):
    """`fla.modules.norm.layernorm_gated.rmsnorm_fn` (Mamba2's `RMSNormGated`): RMS norm per group of
    `group_size` channels, gated by `silu(z)` before or after the norm, computed in float32."""
    dtype = x.dtype
    x = x.float()
    if z is not None and not norm_before_gate:
        x = x * F.silu(z.float())
    groups = 1 if group_size is None else x.shape[-1] // group_size
    y = _normalize(x=x, weight=weight, bias=bias, eps=eps, is_rms_norm=True, num_groups=groups)
    if z is not None and norm_before_gate:
        y = y * F.silu(z.float())
    return y.to(dtype)
