"""Data parallel with FSDP2: sharded (FSDP), hybrid (HSDP) and replicated (DDP semantics).

Every block of the model's body (`families.blocks`) is its own `fully_shard` unit (its all-gather overlaps
the previous block's compute), then the root. DDP is FSDP2 on a replicate-only mesh (gradients all-reduced, parameters
never sharded): no wrapper module, so `state_dict` names do not change and it composes with tensor parallel.
Gradients are summed, not averaged, across ranks: the loss is already divided by the global token count
(`flame_gin.loss`).
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from flame_gin import families

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str, what: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"data parallel: {what}={name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def apply_data_parallel(
    model: nn.Module,
    *,
    mesh: DeviceMesh,
    mode: str = "fsdp",
    param_dtype: str = "float32",
    reduce_dtype: str = "float32",
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    blocks: list[nn.Module] | None = None,
) -> nn.Module:
    """Applies FSDP2 to `model` in place.

    `mesh`: 1-D (FSDP over `dp_shard_cp`) or 2-D (`dp_replicate`, `dp_shard_cp`: HSDP; with a shard size of 1,
    DDP). `mode`: "fsdp" (shard, or HSDP on a 2-D mesh) or "ddp" (needs a shard size of 1). `blocks`: the
    units to shard separately (default: the body's blocks, `families.blocks`).
    """
    if mode not in ("fsdp", "ddp"):
        raise ValueError(f"data parallel: mode={mode!r}; expected 'fsdp' or 'ddp'")
    if mode == "ddp" and mesh.ndim == 2 and mesh.size(1) != 1:
        raise ValueError(
            f"data parallel: mode='ddp' needs dp_shard*cp == 1, got a shard dimension of "
            f"{mesh.size(1)}; use mode='fsdp' (HSDP) instead"
        )
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(
        param_dtype=_dtype(param_dtype, "param_dtype"), reduce_dtype=_dtype(reduce_dtype, "reduce_dtype")
    )
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else None
    reshard = reshard_after_forward and mode == "fsdp"
    kwargs = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    if offload is not None:
        kwargs["offload_policy"] = offload
    if blocks is None:
        layers = getattr(families.body(model), "layers", [])
        blocks = list(layers.values() if isinstance(layers, nn.ModuleDict) else layers)
    for i, block in enumerate(blocks):
        # the last block is resharded at the end of forward anyway only to be gathered again for backward
        fully_shard(block, **{**kwargs, "reshard_after_forward": reshard and i < len(blocks) - 1})
    fully_shard(model, **kwargs)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo and NCCL both have it
    return model


def set_gradient_sync(model: nn.Module, *, sync: bool) -> None:
    """Turns gradient reduction off for all but the last micro-batch of an accumulation step (a model is FSDP
    only once ``apply_data_parallel`` has imported torch's FSDP, about 0.6 s that a plain run never pays)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and isinstance(model, fsdp.FSDPModule):
        model.set_requires_gradient_sync(sync, recurse=True)
