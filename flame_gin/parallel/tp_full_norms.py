"""Tensor parallel for output norms that span every head (HGRN, HGRN2, LightNet).

Why its own module: these layers normalise their recurrent output over its full width, all heads at once,
then gate it and project it. HGRN2 and LightNet run norm, gate and projection as one fused call
(`rms_norm_linear`, `rms_norm_swish_gate_linear`) that reads both weights itself; HGRN calls a gated norm
module. Under tensor parallel a rank holds only its heads' channels: the mean square is summed over the
ranks (in the forward, and the gradient in the backward, since every rank uses the sum for its own channels)
before each rank normalises its channels, and the projection's partial products are summed after, into the
layout the block expects (the rank's sequence shard under sequence parallel, else the whole output).

`install(module=)` wraps the fused names in a layer's module; a wrapper calls the function it wrapped (FLA's
kernel or the CPU reference) whenever the projection weight is not a DTensor, so an unsharded model is
untouched. `FusedOutputProjection` is the style for the projection those calls read: row-wise, with its
output layout recorded on its weight. `FullWidthGatedNorm` is the style for the gated norm module (HGRN's
`g_norm`).
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, RowwiseParallel

_LAYOUT = "tp_output_layouts"
_FUSED = ("rms_norm_linear", "rms_norm_swish_gate_linear")


class _SumOverRanks(torch.autograd.Function):
    """All-reduce in the forward; in the backward too, since every rank uses the sum for its own channels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        ctx.group = group
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _normalized(*, x, weight, bias, eps: float, mesh: DeviceMesh, gate=None, activation: str = "swish"):
    """RMSNorm of ``x`` (the rank's channels) over the full width, affine, times act(gate); float32."""
    squares = _SumOverRanks.apply(x.float().pow(2).sum(-1, keepdim=True), mesh.get_group())
    y = x.float() * torch.rsqrt(squares / (x.shape[-1] * mesh.size()) + eps)
    if weight is not None:
        y = y * _local(weight)
    if bias is not None:
        y = y + _local(bias)
    if gate is not None:
        if activation not in ("swish", "silu", "sigmoid"):
            raise ValueError(f"tensor parallel: gate activation {activation!r} has no plan")
        y = y * (torch.sigmoid(gate.float()) if activation == "sigmoid" else F.silu(gate.float()))
    return y


class FusedOutputProjection(ParallelStyle):
    """The output projection a fused norm call reads itself: its weight row-wise (as `RowwiseParallel` holds
    it), with the layout of the call's output recorded on it (the rank's sequence shard under sequence
    parallel, else the whole output)."""

    def __init__(self, *, sequence_parallel: bool):
        super().__init__()
        self.layouts = (Shard(1),) if sequence_parallel else (Replicate(),)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        RowwiseParallel(output_layouts=self.layouts[0])._apply(module, device_mesh)
        setattr(module.weight, _LAYOUT, self.layouts)
        return module


def _project(y, linear_weight, linear_bias):
    mesh = linear_weight.device_mesh
    channels = DTensor.from_local(y.to(linear_weight.dtype), mesh, [Shard(-1)], run_check=False)
    out = F.linear(channels, linear_weight, linear_bias)
    return out.redistribute(mesh, getattr(linear_weight, _LAYOUT)).to_local()


def _wrap(inner, *, gated: bool):
    @functools.wraps(inner)
    def call(x, *args, residual=None, prenorm=False, residual_in_fp32=False, eps=None):
        gate, (norm_weight, norm_bias, linear_weight, linear_bias) = (args[0], args[1:]) if gated else (None, args)
        if not isinstance(linear_weight, DTensor):
            kwargs = dict(residual=residual, prenorm=prenorm, residual_in_fp32=residual_in_fp32)
            return inner(x, *args, **kwargs, **({} if eps is None else {"eps": eps}))
        if residual is not None or prenorm:
            raise ValueError("tensor parallel: a full-width output norm with a residual has no plan")
        eps = (1e-6 if gated else 1e-5) if eps is None else eps  # FLA's defaults for the two calls
        y = _normalized(x=x, weight=norm_weight, bias=norm_bias, eps=eps, mesh=linear_weight.device_mesh, gate=gate)
        return _project(y, linear_weight, linear_bias)

    call.tensor_parallel_wrapper = True
    return call


def install(*, module: str) -> None:
    """Wraps the fused norm-projection calls that ``module`` imported (idempotent)."""
    mod = importlib.import_module(module)
    names = [name for name in _FUSED if getattr(mod, name, None) is not None]
    if not names:
        raise RuntimeError(f"tensor parallel: FLA module {module} calls none of {', '.join(_FUSED)}")
    for name in names:
        fn = getattr(mod, name)
        if not getattr(fn, "tensor_parallel_wrapper", False):
            setattr(mod, name, _wrap(fn, gated="gate" in name))


class FullWidthGatedNorm(ParallelStyle):
    """A gated RMSNorm module (FLA's `FusedRMSNormGated`) over head-sharded channels: its weight and bias by
    channel, the mean square summed over the ranks; called as ``norm(x, gate)`` with both the rank's channels."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(
                name, nn.Parameter(distribute_tensor(param.data, device_mesh, [Shard(0)]), param.requires_grad)
            )

        def forward(x, g, residual=None, prenorm=False, residual_in_fp32=False):
            if residual is not None or prenorm:
                raise ValueError("tensor parallel: a full-width gated norm with a residual has no plan")
            y = _normalized(
                x=x,
                weight=module.weight,
                bias=module.bias,
                eps=module.eps,
                mesh=device_mesh,
                gate=g,
                activation=module.activation,
            )
            return y.to(x.dtype)

        module.forward = forward
        return module
