"""Phases 1-5 of a run, before the loop: plan (cheap checks), data, the meta model, build, describe.

Why a module of its own: each phase takes only the settings it needs and returns a small frozen record, so
``flame_gin.trainer.run`` reads as the list of phases and every check that must fail before anything big is
built (or any file written) sits in one place, in the order it runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import pathlib
from typing import Any, Callable

import torch
import torch.distributed as dist
from absl import logging

from flame_gin import checks, families, kernels, models, process
from flame_gin import config as config_lib
from flame_gin import loss as loss_lib
from flame_gin import mesh as mesh_lib
from flame_gin import parallel as parallel_lib


@contextlib.contextmanager
def as_config_error():
    """Turns a builder's complaint about its arguments (raised before any training) into a ``ConfigError``."""
    try:
        yield
    except config_lib.ConfigError:
        raise
    except (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError) as e:
        raise config_lib.ConfigError(f"{type(e).__name__}: {e}") from e


def parallel_degrees(
    *, make: Callable[..., Any] | None, world_size: int, batch_size: int, seq_len: int, varlen: bool, model_config
) -> mesh_lib.ParallelDims:
    """Phase: the parallel degrees (default: every rank data parallel), checked against the batch and the
    model config before anything is built."""
    dims = (make or mesh_lib.ParallelDims)(world_size=world_size)
    dims.validate_for_batch(global_batch_size=batch_size, seq_len=seq_len, varlen=varlen)
    dims.validate_for_model(config=model_config)
    if dims.cp > 1:
        from flame_gin.parallel.context import check_context_parallel_config

        check_context_parallel_config(config=model_config)
    if dims.tp > 1:
        from flame_gin.parallel.tp_plans import check_tensor_parallel_config  # DTensor's stack: only when used

        check_tensor_parallel_config(config=model_config)
    if dims.pp > 1 and dims.cp > 1:
        raise config_lib.ConfigError(
            f"pipeline stages do not hand context-parallel state across ranks: "
            f"ParallelDims.pp={dims.pp} with ParallelDims.cp={dims.cp}; use one of them"
        )
    return dims


def _parallel_model(
    *,
    model,
    dims: mesh_lib.ParallelDims,
    mesh,
    parallelize: Callable[..., Any] | None,
    pipeline: Callable[..., Any] | None,
    device: torch.device,
    fused: str | bool,
):
    """Phase: context-parallel hooks, then parallelisms (TP -> AC -> compile -> FSDP) on the whole model, or on
    each pipeline stage. Returns the module the optimizer, clipping and checkpoints see (for a pipeline: this
    rank's stages under the unsplit model's names) and the pipeline runtime (None without one)."""
    if dims.cp > 1:
        from flame_gin.parallel.context import enable_context_parallel

        enable_context_parallel(model)
    apply = functools.partial(parallelize or parallel_lib.parallelize, dims=dims, mesh=mesh)
    if dims.pp == 1:
        return apply(model).train(), None
    runtime = pipeline(
        model,
        pp_mesh=mesh["pp"],
        parallelize_stage=apply,
        stage_mesh=mesh["dp_shard_cp"],
        device=device,
        token_loss_sum=lambda logits, labels: loss_lib.token_loss_sum(logits=logits, labels=labels, fused=fused),
    )
    return runtime.model, runtime


def _memory_estimate(*, meta, dims: mesh_lib.ParallelDims, micro_batch: int, seq_len: int, device: torch.device) -> str:
    """Phase: the per-rank memory estimate of this mesh and micro-batch, from the meta model (nothing
    allocated); bf16 activations on GPU, fp32 on CPU; without activation checkpointing (an upper bound) and
    with every block checkpointed, since the checkpointing asked for is inside the injected `parallelize`."""
    from flame_gin.parallel import memory

    estimates = memory.estimate_memory_modes(
        model=meta,
        dims=dims,
        local_batch=micro_batch,
        seq_len=seq_len,
        modes=("none", "full"),
        param_dtype="bfloat16" if device.type == "cuda" else "float32",
        run_blocks=kernels.traceable(model=meta),
    )
    return memory.format_estimate(
        estimates["none"], compiled=kernels.current_mode() == "compiled", checkpointed=estimates["full"]
    )


@dataclasses.dataclass(frozen=True)
class Plan:
    """What phase 1 settled before anything big is built."""

    proc: process.ProcessInfo
    model_config: Any
    lr_schedule: Callable[[int], float]
    dims: mesh_lib.ParallelDims
    micro_batch: int
    numbers: dict  # the batch arithmetic checks.run_numbers validates
    use_fused: bool | str
    kernel_used: str
    kernel_choices: pathlib.Path | None = None  # the folder of autotuning choices a new run starts from


def plan(
    *,
    model_config: Callable[[], Any],
    lr_schedule: Callable[..., Callable[[int], float]],
    parallel_dims: Callable[..., Any] | None,
    pipeline: Callable[..., Any] | None,
    workdir: str,
    numbers: dict,
    evaluation,
    checkpointer,
    kernel_mode: str,
    downstream: Any | None = None,
    fused_loss: Any,
    init_timeout_seconds: float,
    train_timeout_seconds: float | None,
    nccl_trace_buffer_size: int | None,
    kernel_choices_from: str | None = None,
    host_collectives: bool = False,
) -> Plan:
    """Phase 1: the process group, then every cheap check (schedule, parallel degrees, batch arithmetic,
    whether the family runs on this device, the kernel and loss modes, the run directory, the folder of
    autotuning choices named to start from). ``host_collectives``: the process group carries host tensors too
    (FSDP's CPU offload, ``process.backend``)."""
    with as_config_error():
        proc = process.init(
            timeout_seconds=init_timeout_seconds,
            nccl_trace_buffer_size=nccl_trace_buffer_size,
            host_collectives=host_collectives,
        )
        if train_timeout_seconds is not None and train_timeout_seconds <= 0:
            raise ValueError(f"train_timeout_seconds={train_timeout_seconds} must be positive")
    # What needs neither FLA nor the model config first: importing FLA alone takes ~12 s on a CPU.
    checks.scalars(train_steps=numbers["train_steps"], seq_len=numbers["seq_len"], lr=numbers["lr"])
    checks.batch(batch_size=numbers["batch_size"], grad_accum_steps=numbers["grad_accum_steps"])
    if evaluation is not None:
        checks.evaluation(interval=evaluation.interval, batches=evaluation.batches)
    if checkpointer is not None:
        with as_config_error():
            checkpointer.validate()
    if downstream is not None:
        with as_config_error():
            downstream.validate(world_size=proc.world_size)
    checks.kernel_mode(mode=kernel_mode, cuda=proc.device.type == "cuda")
    checks.workdir(workdir)
    with as_config_error():
        choices = kernels.cache.choices_source(path=kernel_choices_from) if kernel_choices_from else None
        use_fused = loss_lib.fused_mode(fused_loss=fused_loss, device_type=proc.device.type)
        schedule = lr_schedule(total_steps=numbers["train_steps"])
    with as_config_error():
        config = model_config()
        dims = parallel_degrees(
            make=parallel_dims,
            world_size=proc.world_size,
            batch_size=numbers["batch_size"],
            seq_len=numbers["seq_len"],
            varlen=numbers["varlen"],
            model_config=config,
        )
    if dims.pp > 1 and evaluation is not None:
        raise config_lib.ConfigError(
            f"evaluation does not run through pipeline stages (ParallelDims.pp={dims.pp}); "
            f"set flame_gin.evaluation.interval = 0 or evaluate the checkpoints separately"
        )
    if dims.pp > 1 and pipeline is None:
        raise config_lib.ConfigError(
            f"ParallelDims.pp={dims.pp} needs a schedule: set flame_gin.run.pipeline = "
            f"@flame_gin.build_pipeline (see gin/parallel/pp2.gin)"
        )
    kernel_used = kernels.select(mode=kernel_mode)
    with as_config_error():
        families.check_device(config=config, device_type=proc.device.type)
    for warning in (
        families.speed_warning(config=config, device_type=proc.device.type),
        families.unchecked_warning(config=config),
    ):
        if warning and proc.is_primary:
            logging.warning(warning)
    numbers = dict(numbers, dp_size=dims.dp_size, model_config=config)
    micro_batch = checks.run_numbers(**numbers, vocab_size=None)
    return Plan(
        proc=proc,
        model_config=config,
        lr_schedule=schedule,
        dims=dims,
        micro_batch=micro_batch,
        numbers=numbers,
        use_fused=use_fused,
        kernel_used=kernel_used,
        kernel_choices=choices,
    )


def data(*, plan: Plan, train_data: Callable[..., Any], eval_data: Callable[..., Any] | None, seed: int):
    """Phase 2: this rank's training loader (a bad path fails here), the vocabulary checked against the model
    config, and the evaluation loader (None without evaluation)."""
    shard = dict(
        seq_len=plan.numbers["seq_len"],
        batch_size=plan.micro_batch,
        rank=plan.dims.dp_rank(rank=plan.proc.rank),
        world_size=plan.dims.dp_size,
        seed=seed,
        varlen=plan.numbers["varlen"],
    )
    with as_config_error():
        loader = train_data(**shard, split="train")
    checks.run_numbers(**plan.numbers, vocab_size=getattr(loader, "vocab_size", None))
    return loader, (eval_data(**shard, split="validation") if eval_data is not None else None)


def meta_model(*, plan: Plan) -> int:
    """Phase 3: the model on the meta device, counted and its memory estimated (a config the family cannot
    build fails here, before any file is written); its parameter count."""
    with as_config_error():
        meta = models.build_meta_model(config=plan.model_config)
    if plan.proc.is_primary:
        logging.info(
            _memory_estimate(
                meta=meta,
                dims=plan.dims,
                micro_batch=plan.micro_batch,
                seq_len=plan.numbers["seq_len"],
                device=plan.proc.device,
            )
        )
    return models.count_parameters(meta)


@dataclasses.dataclass(frozen=True)
class Built:
    """What phase 5 built: the (parallelised) model, its mesh, and the loss the loop calls on it."""

    model: torch.nn.Module
    runtime: Any | None
    mesh: Any | None
    mesh_groups: list
    group: Any | None
    loss_fn: Callable[..., Any]
    prepare: Callable[[dict], dict] | None
    pp_group: Any | None  # the pipeline stages' group (None without pipeline parallelism)


def optimizer(*, built: Built, settings, device: torch.device, steps_follow: bool = True) -> torch.optim.Optimizer:
    """Phase 5, last: the optimizer (``optim.AdamW`` settings) over the built model; on a pipeline, each stage
    keeps the state of its own parameters. When training steps follow on a GPU, a model whose parameters,
    gradients and optimizer states cannot fit the device is refused first (`memory.check_states_fit`; the
    settings' ``states_per_parameter``, 0 for an optimizer that does not declare it). A seed checkpoint
    (``steps_follow=False``) allocates no state and is made for a larger mesh, so it is never refused. Under
    FSDP's CPU offload the same holds for the host (`memory.check_host_fits`)."""
    capacity = process.device_capacity(device) if steps_follow else None
    if capacity is not None:  # a GPU run; whatever FSDP's offload keeps on the host must fit there
        from flame_gin.parallel import memory

        states = getattr(settings, "states_per_parameter", 0)
        with as_config_error():
            memory.check_states_fit(model=built.model, device=device, capacity_bytes=capacity, optimizer_states=states)
            memory.check_host_fits(
                model=built.model,
                optimizer_states=states,
                available_bytes=process.host_available(),
                local_ranks=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                pinned_gradients=torch.cuda.is_available(),  # FSDP's offload pins where a GPU exists
            )
    opt = settings.build(model=built.model)
    if built.runtime is not None:
        from flame_gin.parallel import pipeline as pipeline_lib

        pipeline_lib.stage_local_optimizer_state(opt, mesh=built.mesh["dp_replicate", "dp_shard", "cp", "tp"])
    return opt


def build(
    *,
    plan: Plan,
    seed: int,
    parallelize: Callable[..., Any] | None,
    pipeline: Callable[..., Any] | None,
    init_timeout_seconds: float,
    restoring: bool = False,
) -> Built:
    """Phase 5: the model materialised with the seed's initialisation, the device mesh, the parallelisms, and
    the loss: one process keeps the plain path (bitwise the same losses), a mesh calls the whole parallelised
    model. ``restoring``: the run resumes its own checkpoint (``models.build_model``)."""
    proc, dims = plan.proc, plan.dims
    model = models.build_model(config=plan.model_config, device=proc.device, seed=seed, restoring=restoring)
    mesh = dims.build(device_type=proc.device.type) if dist.is_initialized() else None
    names = (*mesh_lib.MESH_DIMS, "dp", "dp_shard_cp", "dp_cp")
    mesh_groups = [mesh[name].get_group() for name in names] if mesh is not None else []
    process.set_timeout(seconds=init_timeout_seconds, groups=mesh_groups)
    fused = plan.use_fused
    if mesh is not None and fused == "linear":
        logging.warning(
            "flame_gin.run.fused_loss='linear' needs the head apart from the model, which a mesh does not have: "
            "FLA's logits kernel is used instead (tensor-parallel logits are reduced by collectives either way)"
        )
        fused = loss_lib.DEFAULT_FUSED
    with as_config_error():
        model, runtime = _parallel_model(
            model=model,
            dims=dims,
            mesh=mesh,
            parallelize=parallelize,
            pipeline=pipeline,
            device=proc.device,
            fused=fused,
        )
    loss_fn = functools.partial(loss_lib.loss_sum if mesh is None else loss_lib.parallel_loss_sum, fused=fused)
    prepare = functools.partial(_shard_for_context, cp_mesh=mesh["cp"]) if dims.cp > 1 else None
    logging.info("parallel: %s", dims.describe())
    group = mesh["dp_cp"].get_group() if mesh is not None else None
    return Built(
        model=model,
        runtime=runtime,
        mesh=mesh,
        mesh_groups=mesh_groups,
        group=group,
        loss_fn=loss_fn,
        prepare=prepare,
        pp_group=mesh["pp"].get_group() if dims.pp > 1 else None,
    )


def _shard_for_context(batch: dict, *, cp_mesh) -> dict:
    return loss_lib.shard_for_context(batch=batch, cp_mesh=cp_mesh)


def describe(*, plan: Plan, model: torch.nn.Module, n_params: int, writer, config_text: str) -> None:
    """Phase 5, last: the model and batch in one log line; hyper-parameters and the resolved config beside
    the curves (TensorBoard's HParams and Text tabs)."""
    logging.info(
        "model %s: %s parameters (%s without embeddings); kernels: %s; micro-batch %d x %d, accumulation %d",
        plan.model_config.model_type,
        f"{n_params:,}",
        f"{models.count_parameters(model, exclude_embeddings=True):,}",
        plan.kernel_used,
        plan.micro_batch,
        plan.numbers["seq_len"],
        plan.numbers["grad_accum_steps"],
    )
    hparams = {key: plan.numbers[key] for key in ("train_steps", "batch_size", "seq_len", "lr")}
    writer.write_hparams({"parameters": n_params, "family": plan.model_config.model_type, **hparams})
    if config_text:
        writer.write_texts(0, {"config": config_text})
