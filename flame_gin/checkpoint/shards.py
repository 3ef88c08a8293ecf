"""Which part of each tensor this rank owns, and its place in the global array.

A checkpoint array is the global (unsharded) tensor. A rank writes the box
of it that its local shard covers, and only when it is the first replica of
that box; on restore it reads back the box its (possibly differently
sharded) tensor covers. The zarr chunk grid is the shard grid, so no two
ranks ever write the same chunk: per-process OCDBT databases are merged by
key, and a chunk written by two ranks would keep only one rank's part.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.distributed as dist

from flame_gin import mesh as mesh_lib

# Plain (unsharded) tensors are split into chunks of about this size so that
# one writer encodes and writes them in parallel.
_PLAIN_CHUNK_BYTES = 64 * 1024**2

_ZARR_DTYPES = {  # zarr v3 data type names
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int16: "int16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.bool: "bool",
}


@dataclasses.dataclass(frozen=True)
class Box:
    """The region of the global array that one local tensor covers."""

    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    # False when the local tensor is not one box of the global array (nested
    # sharding of one dimension): it is then handled as a full tensor.
    contiguous: bool = True

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.shape))

    @property
    def empty(self) -> bool:
        return any(n == 0 for n in self.shape)


def zarr_dtype(*, name: str, dtype: torch.dtype) -> str:
    """The zarr v3 data type of a torch dtype; clear error otherwise."""
    if dtype not in _ZARR_DTYPES:
        raise TypeError(f"tensor {name!r}: dtype {dtype} cannot be checkpointed")
    return _ZARR_DTYPES[dtype]


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """CPU tensor -> numpy array with the same bits (bf16 via ml_dtypes)."""
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes  # ~0.7 s: imported when a bf16 tensor is first saved

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """numpy array -> CPU tensor with the same bits (bf16 via ml_dtypes)."""
    if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16 (read arrays come from tensorstore, which has it)
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def box_of(*, name: str, tensor: torch.Tensor) -> Box:
    """Where this rank's part of `tensor` sits in the global array."""
    if not mesh_lib.is_dtensor(tensor):
        shape = tuple(tensor.shape)
        return Box(global_shape=shape, offset=(0,) * len(shape), shape=shape)
    from torch.distributed.tensor._utils import (
        compute_local_shape_and_global_offset,
    )

    mesh, placements = tensor.device_mesh, tensor.placements
    if any(p.is_partial() for p in placements):
        raise ValueError(f"tensor {name!r}: Partial placements cannot be saved")
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, mesh, placements)
    glob = tuple(tensor.shape)
    chunk = shard_chunks(tensor=tensor)
    ok = all(n == 0 or (o % c == 0 and n == min(c, g - o)) for g, o, n, c in zip(glob, offset, shape, chunk))
    ok = ok and tuple(shape) == tuple(tensor.to_local().shape)
    return Box(global_shape=glob, offset=tuple(offset), shape=tuple(shape), contiguous=ok)


def shard_chunks(*, tensor: torch.Tensor) -> tuple[int, ...]:
    """The zarr chunk shape: the shard grid of a DTensor.

    For a plain tensor one rank writes everything, so any grid is safe; it is
    split along dim 0 into pieces of about 64 MiB for parallel writing.
    """
    glob = tuple(tensor.shape)
    if mesh_lib.is_dtensor(tensor):
        splits = [1] * len(glob)
        for mesh_dim, p in enumerate(tensor.placements):
            if p.is_shard():
                splits[p.dim] *= tensor.device_mesh.size(mesh_dim)
        return tuple(max(1, math.ceil(g / s)) for g, s in zip(glob, splits))
    chunk = [max(1, g) for g in glob]
    if glob:
        nbytes = tensor.numel() * tensor.element_size()
        pieces = min(max(1, glob[0]), max(1, math.ceil(nbytes / _PLAIN_CHUNK_BYTES)))
        chunk[0] = max(1, math.ceil(glob[0] / pieces))
    return tuple(chunk)


def is_writer(*, tensor: torch.Tensor) -> bool:
    """True on the one rank that writes this rank's box (first replica)."""
    if mesh_lib.is_dtensor(tensor):
        coord = tensor.device_mesh.get_coordinate()
        if coord is None:
            return False
        return all(c == 0 for c, p in zip(coord, tensor.placements) if not p.is_shard())
    return not dist.is_initialized() or dist.get_rank() == 0


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict (FQN keyed) into tensors and the rest.

    Tensors get the names `state.<param fqn>.<key>`; everything else
    (param_groups, non-tensor per-parameter values) is returned as plain
    Python to be pickled.
    """
    tensors, other = {}, {"param_groups": state.get("param_groups", []), "state": {}}
    for fqn, per_param in state.get("state", {}).items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{fqn}.{key}"] = value
            else:
                other["state"].setdefault(fqn, {})[key] = value
    return tensors, other
