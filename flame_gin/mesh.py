"""Parallel degrees -> named device meshes, validated before any model is built.

A run is described by five degrees: data-parallel replication (`dp_replicate`, the outer HSDP dimension),
data-parallel sharding (`dp_shard`, FSDP; -1 takes whatever the others leave), context parallel (`cp`),
tensor parallel (`tp`) and pipeline parallel (`pp`). The world mesh is laid out as
`(pp, dp_replicate, dp_shard, cp, tp)` so that tensor-parallel peers are adjacent ranks (fastest links) and
pipeline stages are farthest apart. Flattened views are added for the collectives that span several
dimensions:

- `dp` = dp_replicate x dp_shard: ranks that read distinct data;
- `dp_shard_cp` = dp_shard x cp: the ranks FSDP shards parameters over (context ranks hold the same weights);
- `dp_cp` = dp_replicate x dp_shard x cp: the ranks whose losses are summed (global token count).

Every problem with the shape (product not the world size, tensor parallel not dividing the heads, more
pipeline stages than layers, a sequence that cannot be split) is raised here with the value at fault.
"""

from __future__ import annotations

import dataclasses
import sys

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from flame_gin import families

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


def is_dtensor(tensor) -> bool:
    """Whether ``tensor`` is a DTensor, without importing ``torch.distributed.tensor`` (about 0.6 s, which a
    config error should not wait for): no DTensor can exist before something has imported that module."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local_tensor(tensor):
    """The tensor this rank holds: a DTensor's local shard, any other tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


@dataclasses.dataclass(frozen=True)
class ParallelDims:
    """Validated parallel degrees; `build()` turns them into a named `DeviceMesh`."""

    world_size: int
    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    pp: int = 1

    def __init__(
        self, *, world_size: int, dp_replicate: int = 1, dp_shard: int = -1, cp: int = 1, tp: int = 1, pp: int = 1
    ):
        for name, value in (
            ("world_size", world_size),
            ("dp_replicate", dp_replicate),
            ("cp", cp),
            ("tp", tp),
            ("pp", pp),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelDims: {name} must be an integer >= 1, got {value!r}")
        if not isinstance(dp_shard, int) or (dp_shard < 1 and dp_shard != -1):
            raise ValueError(f"ParallelDims: dp_shard must be -1 (the rest) or an integer >= 1, got {dp_shard!r}")
        others = dp_replicate * cp * tp * pp
        if dp_shard == -1:
            if world_size % others:
                raise ValueError(
                    f"ParallelDims: dp_replicate*cp*tp*pp = {dp_replicate}*{cp}*{tp}*{pp} = {others} does not "
                    f"divide world_size={world_size}, so dp_shard=-1 cannot be inferred"
                )
            dp_shard = world_size // others
        if dp_shard * others != world_size:
            raise ValueError(
                f"ParallelDims: dp_replicate*dp_shard*cp*tp*pp = {dp_replicate}*{dp_shard}*{cp}*{tp}*{pp} = "
                f"{dp_shard * others} != world_size={world_size}"
            )
        for name, value in (
            ("world_size", world_size),
            ("dp_replicate", dp_replicate),
            ("dp_shard", dp_shard),
            ("cp", cp),
            ("tp", tp),
            ("pp", pp),
        ):
            object.__setattr__(self, name, value)

    # ----- derived sizes -------------------------------------------------------------------------------------
    @property
    def dp_size(self) -> int:
        """Number of distinct data streams (size of the loader's world)."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard * self.cp > 1

    @property
    def loss_parallel_size(self) -> int:
        """Ranks whose token counts add up to the global count: data and context ranks."""
        return self.dp_size * self.cp

    def dp_rank(self, *, rank: int) -> int:
        """Index of the data stream that global `rank` reads (ranks differing only in cp/tp/pp share it)."""
        coords = self.coordinates(rank=rank)
        return coords["dp_replicate"] * self.dp_shard + coords["dp_shard"]

    def coordinates(self, *, rank: int) -> dict[str, int]:
        """Position of `rank` along each named mesh dimension (row-major over `MESH_DIMS`)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"ParallelDims: rank {rank} outside world of size {self.world_size}")
        out = {}
        for name in reversed(MESH_DIMS):
            size = getattr(self, name)
            out[name] = rank % size
            rank //= size
        return out

    # ----- validation against a model and a batch ------------------------------------------------------------
    def validate_for_model(self, *, config) -> None:
        """Checks that the model config can be split this way; raises before the model is built. Whether a
        family has a context-parallel path is the context module's question
        (``flame_gin.parallel.context.check_context_parallel_config``), asked by the trainer beside this."""
        name = type(config).__name__
        layers = getattr(config, "num_hidden_layers", None)
        if self.pp > 1:
            if layers is None:
                raise ValueError(f"ParallelDims: pp={self.pp} but {name} has no num_hidden_layers")
            if self.pp > layers:
                raise ValueError(f"ParallelDims: pp={self.pp} is larger than num_hidden_layers={layers} of {name}")
            if families.traits(getattr(config, "model_type", "")).router_loss:
                raise ValueError(
                    f"ParallelDims: pp={self.pp} with {name}: its loss adds the routers' balance term over every "
                    f"block, which no pipeline stage sees whole; train it with data parallelism (FSDP/HSDP)"
                )
        attn = getattr(config, "attn", None)
        if self.cp > 1 and attn:
            raise ValueError(
                f"ParallelDims: cp={self.cp} with softmax attention layers (attn={attn}) in {name}: the "
                f"context-parallel state hand-over covers linear-attention layers only; train this hybrid with "
                f"data, tensor or pipeline parallelism"
            )
        if self.tp > 1 and attn:
            for key in ("num_heads", "num_kv_heads"):
                value = attn.get(key)
                if isinstance(value, int) and value % self.tp:
                    raise ValueError(f"ParallelDims: tp={self.tp} does not divide attn {key}={value} of {name}")
        if self.tp > 1:
            for attr in (
                "num_heads",
                "num_attention_heads",
                "num_key_value_heads",
                "num_kv_heads",
                "num_v_heads",
                "intermediate_size",
                "vocab_size",
            ):
                value = getattr(config, attr, None)
                if isinstance(value, int) and value % self.tp:
                    raise ValueError(f"ParallelDims: tp={self.tp} does not divide {attr}={value} of {name}")
            if getattr(config, "attnres_block_size", None) is not None:
                raise ValueError(f"ParallelDims: tp={self.tp} is not supported with attnres_block_size in {name}")

    def validate_for_batch(self, *, global_batch_size: int, seq_len: int, varlen: bool = False) -> None:
        """Checks the global batch splits over data ranks and the sequence over context/tensor ranks."""
        if global_batch_size % self.dp_size:
            raise ValueError(
                f"ParallelDims: global batch size {global_batch_size} is not divisible by the "
                f"data-parallel size {self.dp_size} (dp_replicate*dp_shard)"
            )
        split = self.cp * self.tp
        if seq_len % split:
            raise ValueError(
                f"ParallelDims: seq_len={seq_len} is not divisible by cp*tp={split} (context slices "
                f"and sequence-parallel shards)"
            )
        if varlen and self.pp > 1:
            raise ValueError("ParallelDims: varlen (cu_seqlens) batches are not supported with pipeline parallel")

    # ----- mesh ----------------------------------------------------------------------------------------------
    def build(self, *, device_type: str = "cpu") -> DeviceMesh:
        """World mesh with dims `MESH_DIMS` plus flattened `dp`, `dp_shard_cp`, `dp_cp` (needs an initialised
        default process group whose size is `world_size`)."""
        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build: torch.distributed is not initialised")
        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"ParallelDims.build: world_size={self.world_size} but the process group has "
                f"{dist.get_world_size()} ranks"
            )
        shape = tuple(getattr(self, n) for n in MESH_DIMS)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
        mesh["dp_replicate", "dp_shard"]._flatten("dp")
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        return mesh

    def describe(self) -> str:
        parts = [f"{n}={getattr(self, n)}" for n in MESH_DIMS]
        return f"world={self.world_size} " + " ".join(parts) + f" (data streams={self.dp_size})"
