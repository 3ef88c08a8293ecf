"""The training run: ``run()`` validates, builds, then loops over named phases until the last step.

Order of work (the numbered comments in ``run``):
  1. set up the process and validate the config cheaply (schedule, parallel degrees, batch arithmetic, whether
     the family runs on this device and honours varlen);
  2. data (a bad path fails here), then the vocabulary check against the model config;
  3. the model on the meta device (counted, memory estimated): a config the family cannot build fails here;
  4. only then the run directory (``config.gin``), the metric writers and the kernel cache;
  5. the model materialised, initialised and parallelised; the optimizer with its parameter groups;
  6. start: resume the run's checkpoint, warm-start, or keep the seeded initialisation;
  7. loop: fetch micro-batches -> forward/backward -> clip -> optimizer step -> log -> eval -> checkpoint ->
     housekeeping (GC, profiler, preemption);
  8. final save, flush metrics, shut the process group down.
A resumed run is the same run: step, tokens seen, RNG states and every rank's data-iterator state are
restored, and the LR comes from the step through a pure schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import pathlib
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from absl import logging

from flame_gin import checkpoint as checkpoint_lib
from flame_gin import checks, families, flops, kernels, metrics, models, optim, process, start, steps
from flame_gin import config as config_lib
from flame_gin import loss as loss_lib
from flame_gin import mesh as mesh_lib
from flame_gin import parallel as parallel_lib
from flame_gin.parallel import compile as compile_lib

PREEMPTED_EXIT_CODE = checkpoint_lib.REQUEUE_EXIT_CODE  # Slurm's requeue convention, one definition


@dataclasses.dataclass
class TrainState:
    """What the loop counts, saved in every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0


def _after_first_step(
    *,
    is_primary: bool,
    workdir: pathlib.Path,
    on_first_step: Callable[[], str] | None,
    save_compiled: bool,
    train_timeout_seconds: float | None,
    groups: list,
) -> None:
    """Phase, once after this process's first step: collectives get the training-time timeout (the first step's
    compilation and autotuning are over), the operative config (what gin really used) is written, and the
    compiled blocks' artifacts are kept for a resume."""
    if train_timeout_seconds is not None:
        process.set_timeout(seconds=train_timeout_seconds, groups=groups)
    if on_first_step is not None and is_primary:
        config_lib.write_config(workdir=workdir, text=on_first_step(), name=config_lib.OPERATIVE_CONFIG_FILE)
    if save_compiled and is_primary:
        compile_lib.save_compile_cache(workdir=workdir)


@contextlib.contextmanager
def _as_config_error():
    """Turns a builder's complaint about its arguments (raised before any training) into a ``ConfigError``."""
    try:
        yield
    except config_lib.ConfigError:
        raise
    except (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError) as e:
        raise config_lib.ConfigError(f"{type(e).__name__}: {e}") from e


def _parallel_dims(
    *, make: Callable[..., Any] | None, world_size: int, batch_size: int, seq_len: int, varlen: bool, model_config
) -> mesh_lib.ParallelDims:
    """Phase: the parallel degrees (default: every rank data parallel), checked against the batch and the
    model config before anything is built."""
    dims = (make or mesh_lib.ParallelDims)(world_size=world_size)
    dims.validate_for_batch(global_batch_size=batch_size, seq_len=seq_len, varlen=varlen)
    dims.validate_for_model(config=model_config)
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
    parallelize_stage = lambda stage: steps.shard_plain_stage(apply(stage), mesh=mesh["dp_shard_cp"])
    runtime = pipeline(model, pp_mesh=mesh["pp"], parallelize_stage=parallelize_stage, device=device)
    for stage in runtime.stages:
        stage.train()
    return steps.stage_union(runtime.stages), runtime


def _memory_estimate(*, meta, dims: mesh_lib.ParallelDims, micro_batch: int, seq_len: int, device: torch.device) -> str:
    """Phase: the per-rank memory estimate of this mesh and micro-batch, from the meta model (nothing
    allocated); bf16 activations on GPU, fp32 on CPU, no activation checkpointing (an upper bound)."""
    from flame_gin.parallel import memory

    estimate = memory.estimate_memory(
        model=meta,
        dims=dims,
        local_batch=micro_batch,
        seq_len=seq_len,
        param_dtype="bfloat16" if device.type == "cuda" else "float32",
        run_blocks=not (device.type == "cuda" and kernels.current_mode() == "triton"),
    )
    return memory.format_estimate(estimate, compiled=kernels.current_mode() == "compiled")


def run(
    *,
    workdir: str,
    model_config: Callable[[], Any],
    train_data: Callable[..., Any],
    eval_data: Callable[..., Any] | None = None,
    train_steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    lr_schedule: Callable[..., Callable[[int], float]],
    optimizer: Callable[..., torch.optim.Optimizer] = optim.adamw,
    weight_decay: float = 0.1,
    grad_accum_steps: int = 1,
    max_grad_norm: float = 1.0,
    skip_nonfinite: bool = True,
    seed: int = 42,
    deterministic: bool = False,
    gc_interval: int = 50,
    eval_interval: int = 0,
    eval_batches: int = 0,
    log_interval: int = 10,
    kernel_mode: str = "auto",
    fused_loss: str = "auto",
    varlen: bool = False,
    writers: Callable[..., metrics.MetricWriter] = metrics.create_writers,
    checkpointer: Callable[..., Any] | None = None,
    profiler: Callable[..., Any] | None = None,
    peak_tflops: float | None = None,
    config_text: str = "",
    on_first_step: Callable[[], str] | None = None,
    stop_requested: Callable[[], bool] | None = None,
    parallel_dims: Callable[..., Any] | None = None,
    parallelize: Callable[..., Any] | None = None,
    restore_step: int | None = None,
    init_from: str | None = None,
    init_from_hf: str | None = None,
    seed_checkpoint_only: bool = False,
    pipeline: Callable[..., Any] | None = None,
    init_timeout_seconds: float = 600.0,
    train_timeout_seconds: float | None = None,
    nccl_trace_buffer_size: int | None = None,
    compile_cache: bool = True,
    kernel_cache: bool = True,
) -> int:
    """Trains to ``train_steps`` (resuming from ``workdir`` when it holds checkpoints); returns an exit status.

    0 when training finished, ``PREEMPTED_EXIT_CODE`` (42) when a stop was requested (SIGTERM/SIGUSR2) and the
    state was saved, so a Slurm wrapper can requeue the job. ``parallel_dims(world_size=)`` gives the
    ``ParallelDims`` (default: every rank data parallel) and ``parallelize(model, dims=, mesh=)`` applies them;
    with ``pp > 1``, ``pipeline(model, pp_mesh=, parallelize_stage=, device=)`` (``flame_gin.build_pipeline``)
    splits the model into stages and builds the schedule. Collectives time out after ``init_timeout_seconds``
    until the first step is done, then after ``train_timeout_seconds`` (None: unchanged);
    ``nccl_trace_buffer_size`` sizes NCCL's flight recorder (None: the environment's setting). ``compile_cache``
    keeps compiled blocks' artifacts in the workdir after the first step and loads them on a resume;
    ``kernel_cache`` keeps FLA's Triton kernels and autotuning choices in ``workdir/kernel_cache``
    (`flame_gin.kernels.cache`), so a resumed run skips autotuning and runs the same kernel configurations.
    """
    # 1. Set up the process, then validate everything cheap before building anything big.
    with _as_config_error():
        proc = process.init(timeout_seconds=init_timeout_seconds, nccl_trace_buffer_size=nccl_trace_buffer_size)
        if train_timeout_seconds is not None and train_timeout_seconds <= 0:
            raise ValueError(f"train_timeout_seconds={train_timeout_seconds} must be positive")
    with _as_config_error():
        model_config = model_config()
        lr_schedule = lr_schedule(total_steps=train_steps)
        dims = _parallel_dims(
            make=parallel_dims,
            world_size=proc.world_size,
            batch_size=batch_size,
            seq_len=seq_len,
            varlen=varlen,
            model_config=model_config,
        )
    dp_size, dp_rank = dims.dp_size, dims.dp_rank(rank=proc.rank)
    if dims.pp > 1 and eval_data is not None and eval_interval:
        raise config_lib.ConfigError(
            f"evaluation does not run through pipeline stages (ParallelDims.pp={dims.pp}); "
            f"set flame_gin.run.eval_interval = 0 or evaluate the checkpoints separately"
        )
    if dims.pp > 1 and pipeline is None:
        raise config_lib.ConfigError(
            f"ParallelDims.pp={dims.pp} needs a schedule: set flame_gin.run.pipeline = "
            f"@flame_gin.build_pipeline (see gin/parallel/pp2.gin)"
        )
    checks.kernel_mode(mode=kernel_mode, cuda=proc.device.type == "cuda")
    checks.workdir(workdir)
    kernel_used = kernels.select(mode=kernel_mode)
    with _as_config_error():
        families.check_device(config=model_config, device_type=proc.device.type)
    slow = families.speed_warning(config=model_config, device_type=proc.device.type)
    if slow and proc.is_primary:
        logging.warning(slow)
    numbers = dict(
        train_steps=train_steps,
        batch_size=batch_size,
        grad_accum_steps=grad_accum_steps,
        dp_size=dp_size,
        seq_len=seq_len,
        lr=lr,
        model_config=model_config,
        varlen=varlen,
    )
    micro_batch = checks.run_numbers(**numbers, vocab_size=None)
    with _as_config_error():
        use_fused = loss_lib.fused_mode(fused_loss=fused_loss, device_type=proc.device.type)
    process.seed_everything(seed=seed, deterministic=deterministic)

    # 2. Data (fails early on bad paths), then the vocabulary check against the model config.
    with _as_config_error():
        loader = train_data(
            seq_len=seq_len,
            batch_size=micro_batch,
            rank=dp_rank,
            world_size=dp_size,
            seed=seed,
            split="train",
            varlen=varlen,
        )
    checks.run_numbers(**numbers, vocab_size=getattr(loader, "vocab_size", None))
    eval_loader = (
        eval_data(
            seq_len=seq_len,
            batch_size=micro_batch,
            rank=dp_rank,
            world_size=dp_size,
            seed=seed,
            split="validation",
            varlen=varlen,
        )
        if eval_data is not None and eval_interval
        else None
    )

    # 3. Model on the meta device (counted, estimated): a config FLA cannot build fails here, before any file.
    with _as_config_error():
        meta = models.build_meta_model(config=model_config)
    n_params = models.count_parameters(meta)
    if proc.is_primary:
        logging.info(
            _memory_estimate(meta=meta, dims=dims, micro_batch=micro_batch, seq_len=seq_len, device=proc.device)
        )
    del meta

    # 4. Run directory: only now that the config is known to be sound (the checkpointer's own settings last).
    workdir_path = pathlib.Path(workdir)
    with _as_config_error():
        ckpt = checkpointer(directory=str(workdir_path / "checkpoints")) if checkpointer is not None else None
    if proc.is_primary:
        config_lib.write_config(workdir=workdir_path, text=config_text)
    writer = writers(workdir=workdir_path, is_primary=proc.is_primary)
    if kernel_cache and proc.device.type == "cuda":  # before any Triton kernel compiles
        kernels.cache.use_run_dir(workdir=workdir_path)

    # 5. Model materialised and initialised with the seed; optimizer with groups.
    # Before any block is compiled (at its first call); a run that loaded the file keeps it as it is.
    save_compiled = compile_cache and not compile_lib.load_compile_cache(workdir=workdir_path)
    model = models.build_model(config=model_config, device=proc.device, seed=seed)
    mesh = dims.build(device_type=proc.device.type) if dist.is_initialized() else None
    mesh_groups = (
        [mesh[name].get_group() for name in (*mesh_lib.MESH_DIMS, "dp", "dp_shard_cp", "dp_cp")]
        if mesh is not None
        else []
    )
    process.set_timeout(seconds=init_timeout_seconds, groups=mesh_groups)
    with _as_config_error():
        model, runtime = _parallel_model(
            model=model, dims=dims, mesh=mesh, parallelize=parallelize, pipeline=pipeline, device=proc.device
        )
    # One process keeps the plain path (bitwise the same losses); a mesh calls the whole parallelised model.
    group = mesh["dp_cp"].get_group() if mesh is not None else None
    loss_fn = functools.partial(loss_lib.loss_sum, fused=use_fused) if mesh is None else loss_lib.parallel_loss_sum
    if mesh is not None and fused_loss not in ("auto", "off", False):
        logging.warning(
            "flame_gin.run.fused_loss=%r has no effect on a mesh: the parallel loss computes "
            "vocabulary-sharded logits itself",
            fused_loss,
        )
    prepare = (
        (lambda batch: loss_lib.shard_for_context(batch=batch, cp_mesh=mesh["cp"]))
        if dims.cp > 1
        else (lambda batch: batch)
    )
    logging.info("parallel: %s", dims.describe())
    groups = optim.parameter_groups(model=model, weight_decay=weight_decay)
    opt = optimizer(params=groups, lr=lr)
    if runtime is not None:
        steps.stage_local_optimizer_state(opt, mesh=mesh["dp_replicate", "dp_shard", "cp", "tp"])
    flops_per_token = flops.training_flops_or_none(config=model_config, seq_len=seq_len)
    peak_tflops = flops.device_peak_tflops(device=proc.device, configured=peak_tflops)
    logging.info(
        "model %s: %s parameters (%s without embeddings); kernels: %s; micro-batch %d x %d, accumulation %d",
        model_config.model_type,
        f"{n_params:,}",
        f"{models.count_parameters(model, exclude_embeddings=True):,}",
        kernel_used,
        micro_batch,
        seq_len,
        grad_accum_steps,
    )
    writer.write_hparams(
        {
            "parameters": n_params,
            "family": model_config.model_type,
            "train_steps": train_steps,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "lr": lr,
        }
    )
    if config_text:  # the resolved config beside the curves (TensorBoard's Text tab)
        writer.write_texts(0, {"config": config_text})

    # 6. Start: resume the run's own checkpoint, or warm-start weights, or keep the seeded initialisation.
    if seed_checkpoint_only:
        start.save_seed(workdir=workdir_path, model=model, config_text=config_text)
        return _finish(ckpt=ckpt, prof=None, writer=writer, status=0)
    restored = start.resume_or_initialise(
        ckpt=ckpt,
        model=model,
        optimizer=opt,
        loader=loader,
        restore_step=restore_step,
        init_from=init_from,
        init_from_hf=init_from_hf,
    )
    state = TrainState(**restored) if restored else TrainState()

    prof = profiler(workdir=str(workdir_path), rank=proc.rank) if profiler is not None else None
    iterator = iter(loader)
    if gc_interval > 0:
        gc.disable()
    status, start_time, start_step = 0, time.monotonic(), state.step
    window_start_tokens, window_start = state.tokens_seen, time.perf_counter()
    tally = steps.StepTally(device=proc.device)
    stop_vote = steps.StopVote(stop_requested=stop_requested, device=proc.device, world_size=proc.world_size)

    def read_tally() -> tuple[float, float]:
        """The device's step values, read back: only at logging, saving and the end."""
        loss_value, grad_norm_value, skipped, tokens = tally.read()
        state.tokens_seen += tokens
        if skipped:
            logging.warning(
                "%d step(s) up to step %d skipped: non-finite loss or gradient norm (last loss %s, grad norm %s)",
                skipped,
                state.step,
                loss_value,
                grad_norm_value,
            )
        state.skipped_steps += skipped
        return loss_value, grad_norm_value

    def save(final: bool = False) -> bool:
        if ckpt is None or not (final or ckpt.should_save(step=state.step)):
            return False
        read_tally()
        return _save(
            ckpt=ckpt, state=state, model=model, optimizer=opt, loader=loader, config_text=config_text, dp_rank=dp_rank
        )

    # 7. The loop.
    while state.step < train_steps:
        step_start = time.perf_counter()
        batches, local_tokens, data_wait = steps.fetch(iterator, count=grad_accum_steps, device=proc.device)
        if dims.cp > 1:  # each context rank keeps its slice of the sequence: count what it kept
            batches = [prepare(b) for b in batches]
            local_tokens = steps.valid_tokens(batches)
        tokens = steps.global_tokens(local=local_tokens, device=proc.device, group=group)
        if runtime is None:
            loss = steps.forward_backward(
                model=model, batches=batches, tokens=tokens, device=proc.device, loss_fn=loss_fn, group=group
            )
        else:
            loss = steps.pipeline_forward_backward(
                runtime=runtime, batches=batches, tokens=tokens, device=proc.device, group=group
            )
        grad_norm = steps.clip_grad_norm(
            model=model, max_grad_norm=max_grad_norm, pp_group=mesh["pp"].get_group() if dims.pp > 1 else None
        )
        lr_now = lr * lr_schedule(state.step)
        tally.add(
            loss=loss,
            grad_norm=grad_norm,
            tokens=tokens,
            skipped=steps.apply(
                optimizer=opt, lr_now=lr_now, loss=loss, grad_norm=grad_norm, skip_nonfinite=skip_nonfinite
            ),
        )
        state.step += 1
        if state.step == start_step + 1:
            _after_first_step(
                is_primary=proc.is_primary,
                workdir=workdir_path,
                on_first_step=on_first_step,
                save_compiled=save_compiled,
                train_timeout_seconds=train_timeout_seconds,
                groups=mesh_groups,
            )

        # Log (the only per-step read-back of device values).
        if log_interval and (state.step % log_interval == 0 or state.step == train_steps):
            loss_value, grad_norm_value = read_tally()
            elapsed = time.perf_counter() - window_start
            tokens_per_second = (state.tokens_seen - window_start_tokens) / max(elapsed, 1e-9)
            scalars = {
                "loss": loss_value,
                "lr": lr_now,
                "grad_norm": grad_norm_value,
                "tokens_per_second": tokens_per_second,
                "tokens_seen": state.tokens_seen,
                "step_time": time.perf_counter() - step_start,
                "data_wait_time": data_wait,
                "peak_memory_gib": process.peak_memory_gib(proc.device),
                "skipped_steps": state.skipped_steps,
            }
            if flops_per_token and peak_tflops:
                scalars["mfu"] = flops.mfu(
                    tokens_per_second=tokens_per_second,
                    flops_per_token=flops_per_token,
                    peak_tflops=peak_tflops,
                    devices=proc.world_size,
                )
            for source, count in getattr(loader, "tokens_per_source", {}).items():
                scalars[f"data/tokens/{source}"] = count
            writer.write_scalars(state.step, scalars)
            steps_per_second = (state.step - start_step) / max(time.monotonic() - start_time, 1e-9)
            if proc.is_primary:
                logging.info(
                    metrics.format_progress(
                        step=state.step,
                        total_steps=train_steps,
                        scalars=scalars,
                        eta_seconds=(train_steps - state.step) / max(steps_per_second, 1e-9),
                    )
                )
            window_start_tokens, window_start = state.tokens_seen, time.perf_counter()

        # Evaluate.
        if eval_loader is not None and (state.step % eval_interval == 0 or state.step == train_steps):
            writer.write_scalars(
                state.step,
                steps.evaluate(
                    model=model,
                    loader=eval_loader,
                    device=proc.device,
                    max_batches=eval_batches,
                    loss_fn=loss_fn,
                    prepare=prepare,
                    group=group,
                ),
            )

        # Checkpoint, and stop cleanly when the scheduler asks.
        preempted = stop_vote.poll()
        if ckpt is not None and state.step < train_steps and save(final=preempted):
            writer.write_scalars(state.step, {"checkpoint/blocked_seconds": ckpt.last_blocked_seconds})
        if preempted and state.step < train_steps:  # at the last step the final save below is the stop
            logging.warning("stop requested: state saved at step %d, exiting with %d", state.step, PREEMPTED_EXIT_CODE)
            status = PREEMPTED_EXIT_CODE
            break

        # Housekeeping.
        if gc_interval > 0 and state.step % gc_interval == 0:
            gc.collect(1)
        if prof is not None:
            prof.step(state.step)

    # 8. Finish: final save, flush, shut down.
    if ckpt is not None and status == 0 and state.step > 0:
        save(final=True)
    read_tally()  # warns about skipped steps not yet logged
    gc.enable()
    return _finish(ckpt=ckpt, prof=prof, writer=writer, status=status)


def _finish(*, ckpt, prof, writer, status: int) -> int:
    """Phase: wait for the last save, close the profiler and writers, shut the process group down."""
    if ckpt is not None:
        ckpt.wait()
        ckpt.close()
    if prof is not None:
        prof.close()
    writer.flush()
    writer.close()
    process.shutdown()
    return status


def _save(*, ckpt, state: TrainState, model, optimizer, loader, config_text: str, dp_rank: int) -> bool:
    """Checkpoints model, optimizer and this rank's run state (due-ness already decided); True when it saved.

    The checkpointer gathers every rank's ``extra`` (data-iterator and RNG states).
    """
    extra = {
        "train_state": dataclasses.asdict(state),
        "data": loader.state_dict(),
        "rng": process.rng_state(),
        "dp_rank": dp_rank,
    }
    return bool(
        ckpt.save(step=state.step, model=model, optimizer=optimizer, extra=extra, config_text=config_text, force=True)
    )
