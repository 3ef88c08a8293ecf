"""Tensor parallel for RetNet: each head's fixed decay by its global index.

Why its own module: FLA's retention ops give head h the decay ``1 - 2^(-5-h)``, counting h from 0 over the
heads they are handed. Under tensor parallel a rank holds heads ``offset .. offset + H_local - 1``, and the
ops would give them the decays of heads ``0 .. H_local - 1``: another model, silently. `mark(layer=,
offset=)` records the rank's first head on each retention layer; while that layer runs, the retention names
its module calls compute with the global head indices, through the same chunked recurrence the retention op
runs (FLA's simple-GLA kernel on a GPU, flame_gin's GLA reference when the reference kernels are selected).
A layer that is not marked calls the function it wrapped, unchanged.
"""

from __future__ import annotations

import contextvars
import functools
import importlib

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle

_MODULE = "fla.layers.multiscale_retention"
NAMES = ("chunk_retention", "fused_chunk_retention", "fused_recurrent_retention", "parallel_retention")
_OFFSET: contextvars.ContextVar[int | None] = contextvars.ContextVar("retention_head_offset", default=None)


def _retention(q, k, v, *, offset: int, scale, initial_state, output_final_state, cu_seqlens):
    heads = torch.arange(offset, offset + q.shape[2], dtype=torch.float32, device=q.device)
    gamma = (1 - 2.0 ** (-5.0 - heads)).log()
    from flame_gin import kernels

    if q.device.type == "cuda" and kernels.current_mode() != "reference":
        from fla.ops.simple_gla import chunk_simple_gla

        return chunk_simple_gla(
            q=q,
            k=k,
            v=v,
            g_gamma=gamma,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
        )
    from flame_gin.kernels.attention import chunk_gla

    g = gamma.view(1, 1, -1, 1).expand(*q.shape[:3], q.shape[-1])
    return chunk_gla(
        q,
        k,
        v,
        g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )


def _wrap(inner):
    @functools.wraps(inner)
    def call(*args, **kwargs):
        offset = _OFFSET.get()
        if offset is None:
            return inner(*args, **kwargs)  # exactly as called: the four ops take different arguments
        names = ("q", "k", "v", "scale", "initial_state", "output_final_state", "cu_seqlens")
        given = {**dict(zip(names, args)), **kwargs}
        q, k, v = given.pop("q"), given.pop("k"), given.pop("v")
        return _retention(
            q,
            k,
            v,
            offset=offset,
            scale=given.get("scale"),
            initial_state=given.get("initial_state"),
            output_final_state=given.get("output_final_state", False),
            cu_seqlens=given.get("cu_seqlens"),
        )

    call.tensor_parallel_wrapper = True
    return call


def mark(*, layer: nn.Module, offset: int) -> None:
    """While ``layer`` runs, retention computes its heads as global heads ``offset, offset + 1, ...``."""
    module = importlib.import_module(_MODULE)
    for name in NAMES:
        fn = getattr(module, name, None)
        if fn is None:
            raise RuntimeError(f"tensor parallel: FLA module {_MODULE} has no attribute {name!r}")
        if not getattr(fn, "tensor_parallel_wrapper", False):
            setattr(module, name, _wrap(fn))
    tokens = []
    layer.register_forward_pre_hook(lambda mod, args: tokens.append(_OFFSET.set(offset)))
    layer.register_forward_hook(lambda mod, args, out: _OFFSET.reset(tokens.pop()))


class GlobalHeadDecays(ParallelStyle):
    """Applies ``style`` to a retention layer, then marks the layer with its rank's first head (the rank's
    share of ``num_heads`` times its index on the mesh)."""

    def __init__(self, style: ParallelStyle):
        super().__init__()
        self.style = style

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module = self.style._apply(module, device_mesh)
        mark(layer=module, offset=device_mesh.get_local_rank() * module.num_heads // device_mesh.size())
        return module
