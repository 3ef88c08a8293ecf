"""Applies the parallelisms to a model in torchtitan's order: TP -> activation checkpointing -> compile -> FSDP.

Tensor parallel first (it rewrites parameters into DTensors the later steps must see), checkpointing next (so
recomputation replays the sharded forward), compile per block after that (the checkpoint wrapper is inside
the compiled region), and FSDP last (its all-gather/reduce-scatter hooks wrap the compiled blocks).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from flame_gin import families
from flame_gin.mesh import ParallelDims
from flame_gin.parallel.activation_checkpointing import apply_activation_checkpointing
from flame_gin.parallel.compile import apply_compile
from flame_gin.parallel.fsdp import apply_data_parallel

log = logging.getLogger(__name__)


def _enable_async_tp(*, dims: ParallelDims, compile: bool) -> None:
    if dims.tp == 1 or not compile:
        raise ValueError(
            f"parallelize.async_tp needs tensor parallel and compiled blocks: ParallelDims.tp={dims.tp}, "
            f"parallelize.compile={compile}"
        )
    if not torch.cuda.is_available():
        raise ValueError("parallelize.async_tp needs CUDA (symmetric memory); it has no CPU/gloo path")
    from torch._inductor import config as inductor_config  # only here: no start-up cost for every run

    inductor_config._micro_pipeline_tp = True
    log.info("async tensor parallel: inductor micro-pipelines the TP collectives of compiled blocks")


def _one_graph_each(model: nn.Module) -> bool:
    """Whether each block can compile to one graph: no FLA op that FLA marks `torch.compiler.disable` (every
    FLA Triton op on a GPU, except GLA's and DeltaNet's, which compiled mode makes custom ops). Where one is
    left, `fullgraph` is turned off with a warning: the block compiles around the op (graph breaks) rather
    than the run stopping at its first step, so `gin/parallel/compile.gin` runs for every family; the warning
    says how to compare with no compile, since graph breaks can cost more than fusion gives."""
    from flame_gin import kernels

    if kernels.traceable(model=model):
        return True
    log.warning(
        "compile: fullgraph off: %s call ops that are not graph nodes here (FLA's Triton ops, which FLA keeps "
        "out of torch.compile): each block compiles around them, with graph breaks, which can run slower than "
        "no compile (RWKV-7 did, benchmarks/RESULTS.md); flame_gin.parallelize.compile=False compares "
        "(gin/parallel/checkpointing.gin: checkpointing without compile)",
        ", ".join(kernels.untraced_layers(model=model)) or "FLA's kernels",
    )
    return False


def parallelize(
    model: nn.Module,
    *,
    dims: ParallelDims,
    mesh: DeviceMesh,
    sequence_parallel: bool = True,
    loss_parallel: bool = True,
    activation_checkpointing: str = "none",
    ac_every: int = 1,
    compile: bool = False,
    compile_backend: str = "inductor",
    compile_fullgraph: bool = False,
    compile_mode: str | None = None,
    data_parallel: str = "fsdp",
    param_dtype: str = "float32",
    reduce_dtype: str = "float32",
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    float8: bool = False,
    float8_min_features: int = 1024,
    fsdp_on_one_rank: bool = False,
    async_tp: bool = False,
) -> nn.Module:
    """Parallelises `model` (a whole causal LM, or one pipeline stage) in place and returns it.

    `mesh` is the world mesh from `ParallelDims.build`. Data parallel runs over `dp_shard_cp` (HSDP adds
    `dp_replicate`); it is skipped when that group is a single rank and `dp_replicate` is 1, unless
    `fsdp_on_one_rank` (FSDP2 over one rank: its bf16-parameter/fp32-gradient numerics on a single GPU, and a
    one-device check of the FSDP path). `async_tp` lets inductor overlap the tensor-parallel collectives with
    the matrix products they feed (micro-pipelined TP over CUDA symmetric memory); it needs `tp > 1`, compiled
    blocks and CUDA, and is refused otherwise. `compile_mode` is `torch.compile`'s mode (None: the default;
    "max-autotune-no-cudagraphs" lets inductor time its own matmul templates against cuBLAS, slower to compile).
    """
    if fsdp_on_one_rank and mesh is None:
        raise ValueError(
            "parallelize.fsdp_on_one_rank needs a process group: launch one process with torchrun --nproc_per_node=1"
        )
    sharded = dims.dp_replicate > 1 or dims.dp_shard * dims.cp > 1 or (fsdp_on_one_rank and data_parallel == "fsdp")
    if cpu_offload and not sharded:  # FSDP's offload policy is the only offload: without FSDP it would do nothing
        raise ValueError(
            f"parallelize.cpu_offload=True keeps parameters on the host through FSDP, which this run does not "
            f"apply ({dims.describe()}): on one GPU add gin/parallel/fsdp_one_gpu.gin and launch with torchrun "
            "--nproc_per_node=1"
        )
    if async_tp:
        _enable_async_tp(dims=dims, compile=compile)
    if float8:
        from flame_gin.parallel.float8 import apply_float8

        count = apply_float8(model, min_features=float8_min_features)
        log.info("float8: converted %d linear layers", count)
    if dims.tp > 1:
        from flame_gin.parallel.tp_plans import apply_tensor_parallel  # torch's DTensor stack: ~0.6 s to import

        apply_tensor_parallel(
            model, tp_mesh=mesh["tp"], sequence_parallel=sequence_parallel, loss_parallel=loss_parallel
        )
    apply_activation_checkpointing(families.blocks(model), mode=activation_checkpointing, every=ac_every)
    if compile:
        fullgraph = compile_fullgraph and _one_graph_each(model)
        apply_compile(families.blocks(model), backend=compile_backend, fullgraph=fullgraph, mode=compile_mode)
    if dims.dp_replicate > 1:
        dp_mesh = mesh["dp_replicate", "dp_shard_cp"]
    elif sharded:
        dp_mesh = mesh["dp_shard_cp"]
    else:
        dp_mesh = None
    if data_parallel == "ddp" and dp_mesh is not None and dp_mesh.ndim == 1:
        raise ValueError(
            f"parallelize: data_parallel='ddp' needs dp_shard=1 and cp=1 with dp_replicate>1, got {dims.describe()}"
        )
    if dp_mesh is not None:
        log.info(
            "data parallel: %s over %s (%d ranks), parameters %s, gradient reduction %s%s",
            data_parallel,
            dp_mesh.mesh_dim_names,
            dp_mesh.size(),
            param_dtype,
            reduce_dtype,
            "; parameters, gradients and optimizer states kept on the host (FSDP's offload)" if cpu_offload else "",
        )
        apply_data_parallel(
            model,
            mesh=dp_mesh,
            mode=data_parallel,
            param_dtype=param_dtype,
            reduce_dtype=reduce_dtype,
            reshard_after_forward=reshard_after_forward,
            cpu_offload=cpu_offload,
            blocks=list(families.blocks(model).values())
            if isinstance(families.blocks(model), nn.ModuleDict)
            else list(families.blocks(model)),
        )
    return model
