"""Tensor parallel for an output norm that spans every head: RMSNorm over the full width, then the projection.

Why its own module: FLA's HGRN2 normalises its attention output over all heads at once and runs that norm and
the output projection as one fused call (`rms_norm_linear`) that reads both weights itself, so no module style
can see it. Under tensor parallel a rank holds only its heads' channels: the mean square is summed over the
ranks before each rank normalises its channels, and the projection's partial products are summed after, into
the layout the block expects (the rank's sequence shard under sequence parallel, else the whole output).
`install(module=)` wraps the name in the layer's module; the wrapper calls the function it wrapped (FLA's
kernel or the CPU reference) whenever the projection weight is not a DTensor, so an unsharded model is
untouched. `tag(weight=, sequence_parallel=)` records the output layout on the sharded projection weight.
"""

from __future__ import annotations

import functools
import importlib

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

_LAYOUT = "tp_output_layouts"


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


def tag(*, weight: DTensor, sequence_parallel: bool) -> None:
    """Records where the projection's output goes: sequence-sharded, or whole on every rank."""
    setattr(weight, _LAYOUT, (Shard(1),) if sequence_parallel else (Replicate(),))


def _sharded(x, norm_weight, norm_bias, linear_weight, linear_bias, *, eps: float):
    mesh = linear_weight.device_mesh
    width = x.shape[-1] * mesh.size()
    squares = _SumOverRanks.apply(x.float().pow(2).sum(-1, keepdim=True), mesh.get_group())
    normed = x.float() * torch.rsqrt(squares / width + eps)
    if norm_weight is not None:
        normed = normed * (norm_weight.to_local() if isinstance(norm_weight, DTensor) else norm_weight)
    if norm_bias is not None:
        normed = normed + (norm_bias.to_local() if isinstance(norm_bias, DTensor) else norm_bias)
    channels = DTensor.from_local(normed.to(linear_weight.dtype), mesh, [Shard(-1)], run_check=False)
    out = torch.nn.functional.linear(channels, linear_weight, linear_bias)
    return out.redistribute(mesh, getattr(linear_weight, _LAYOUT)).to_local()


def _wrap(inner):
    @functools.wraps(inner)
    def call(
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
        if not isinstance(linear_weight, DTensor):
            return inner(
                x,
                norm_weight,
                norm_bias,
                linear_weight,
                linear_bias,
                residual=residual,
                eps=eps,
                prenorm=prenorm,
                residual_in_fp32=residual_in_fp32,
            )
        if residual is not None or prenorm:
            raise ValueError("tensor parallel: a full-width output norm with a residual has no plan")
        return _sharded(x, norm_weight, norm_bias, linear_weight, linear_bias, eps=eps)

    call.tensor_parallel_wrapper = True
    return call


def install(*, module: str, name: str = "rms_norm_linear") -> None:
    """Wraps ``module.name`` (idempotent); raises naming both if FLA no longer has it."""
    mod = importlib.import_module(module)
    fn = getattr(mod, name, None)
    if fn is None:
        raise RuntimeError(f"tensor parallel: FLA module {module} has no attribute {name!r}")
    if not getattr(fn, "tensor_parallel_wrapper", False):
        setattr(mod, name, _wrap(fn))
