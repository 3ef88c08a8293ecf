"""The training run: ``run()`` validates, builds, then loops over named phases until the last step.

Order of work (the numbered comments in ``run``; phases 1-5 are functions of ``flame_gin.assembly``, the
loop's phases are methods of ``flame_gin.loop.Loop``):
  1. set up the process and validate the config cheaply (schedule, parallel degrees, batch arithmetic, whether
     the family runs on this device and honours varlen);
  2. data (a bad path fails here), then the vocabulary check against the model config;
  3. the model on the meta device (counted, memory estimated): a config the family cannot build fails here;
  4. only then the run directory (``config.gin``), the metric writers and the kernel cache;
  5. the model materialised, initialised and parallelised; the optimizer with its parameter groups (a config
     error here removes a run directory that step 4 made, so a refused new run leaves nothing behind);
  6. start: resume the run's checkpoint, warm-start, or keep the seeded initialisation;
  7. loop: fetch micro-batches -> forward/backward -> clip -> optimizer step -> log -> eval -> checkpoint ->
     housekeeping (GC, profiler, preemption);
  8. final save, flush metrics, shut the process group down.
A resumed run is the same run: step, tokens seen, RNG states and every rank's data-iterator state are
restored, and the LR comes from the step through a pure schedule.
"""

from __future__ import annotations

import functools
import pathlib
import shutil
from typing import Any, Callable

import torch
from absl import logging

from flame_gin import assembly, checkpoint, first_step, flops, kernels, metrics, models, optim, out_of_memory, process
from flame_gin import config as config_lib
from flame_gin import downstream as downstream_lib
from flame_gin import loop as loop_lib
from flame_gin import start as start_lib
from flame_gin.parallel import compile as compile_lib


def _after_first_step(
    *,
    is_primary: bool,
    workdir: pathlib.Path,
    on_first_step: Callable[[], str] | None,
    save_compiled: bool,
    train_timeout_seconds: float | None,
    groups: list,
    watch: first_step.Watch,
    headroom: Callable[[], None],
) -> None:
    """Phase, once after this process's first step: its duration is logged, then its memory where little is
    left (``headroom``), collectives get the training-time timeout (the first step's compilation and autotuning
    are over), the operative config (what gin really used) is written, and the compiled blocks' artifacts are
    kept for a resume."""
    watch.stop(completed=True)
    headroom()
    if train_timeout_seconds is not None:
        process.set_timeout(seconds=train_timeout_seconds, groups=groups)
    if on_first_step is not None and is_primary:
        config_lib.write_config(workdir=workdir, text=on_first_step(), name=config_lib.OPERATIVE_CONFIG_FILE)
    if save_compiled and is_primary:
        compile_lib.save_compile_cache(workdir=workdir)


def run(
    *,
    workdir: str,
    model_config: Callable[[], Any],
    train_data: Callable[..., Any],
    train_steps: int,
    batch_size: int,
    seq_len: int,
    optimizer: optim.AdamW,
    lr_schedule: Callable[..., Callable[[int], float]],
    evaluation: loop_lib.Evaluation | None = None,
    downstream: downstream_lib.Downstream | None = None,
    start: start_lib.Start | None = None,
    grad_accum_steps: int = 1,
    max_grad_norm: float = 1.0,
    skip_nonfinite: bool = True,
    seed: int = 42,
    deterministic: bool = False,
    varlen: bool = False,
    kernel_mode: str = "auto",
    fused_loss: str = "auto",
    log_interval: int = 10,
    gc_interval: int = 50,
    peak_tflops: float | None = None,
    writers: Callable[..., metrics.MetricWriter] = metrics.create_writers,
    checkpointer: checkpoint.CheckpointSettings | None = None,
    profiler: Callable[..., Any] | None = None,
    parallel_dims: Callable[..., Any] | None = None,
    parallelize: Callable[..., Any] | None = None,
    pipeline: Callable[..., Any] | None = None,
    init_timeout_seconds: float = 600.0,
    train_timeout_seconds: float | None = None,
    nccl_trace_buffer_size: int | None = None,
    compile_cache: bool = True,
    kernel_cache: bool = True,
    kernel_choices_from: str | None = None,
    config_text: str = "",
    on_first_step: Callable[[], str] | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> int:
    """Trains to ``train_steps`` (resuming from ``workdir`` when it holds checkpoints); returns an exit status:
    0 when training finished, ``REQUEUE_EXIT_CODE`` (42) when a stop was requested (SIGTERM/SIGUSR2) and the
    state was saved, so a Slurm wrapper can requeue the job.

    Args (gin: ``flame_gin.run.<name>``; the last three are set by the entry point, not by gin):
      workdir: the run directory (``--workdir``): config, checkpoints, metrics, kernel and compile caches.
      model_config: builds the FLA model config (``@flame_gin.model_config``: family, sizes, overrides).
      train_data: builds this rank's training loader (``@flame_gin.build_loader``), given its shard.
      train_steps: optimizer steps of the whole run (a resumed run continues to the same number).
      batch_size: global batch in sequences, over every data-parallel rank and accumulation step.
      seq_len: tokens per sequence (with ``varlen``, tokens per packed row).
      optimizer: the optimizer's settings, learning rate included (``@flame_gin.adamw()``, ``optim.AdamW``).
      lr_schedule: ``total_steps -> (step -> multiplier of the peak lr)`` (``@flame_gin.lr_schedule``).
      evaluation: held-out loss settings (``@flame_gin.evaluation()``, ``loop.Evaluation``); None: none.
      downstream: lm-evaluation-harness tasks during training (``@flame_gin.downstream()``,
        ``downstream.Downstream``; one process only); None: none.
      start: resume/warm-start/seed-checkpoint settings (``@flame_gin.start()``, ``start.Start``); None: resume
        the latest checkpoint when there is one, else the seeded initialisation.
      grad_accum_steps: micro-batches per optimizer step (the global batch is split over them).
      max_grad_norm: the global gradient norm is clipped to this.
      skip_nonfinite: a step with a non-finite loss or gradient norm leaves the weights unchanged (counted).
      seed: the initialisation, data order and RNG seed.
      deterministic: deterministic torch algorithms (slower; for debugging a difference).
      varlen: pack documents into rows and keep them apart in attention (families that honour ``cu_seqlens``).
      kernel_mode: ``auto`` / ``triton`` / ``compiled`` / ``reference`` (``flame_gin.kernels``).
      fused_loss: ``auto``, ``linear`` (head + loss fused), ``logits`` (FLA's loss on logits) or ``off``.
      log_interval: steps between metric rows (loss, lr, grad norm, tokens/s, MFU, memory).
      gc_interval: steps between Python garbage collections (0: Python's own schedule).
      peak_tflops: the device's peak for MFU (None: looked up from the device name).
      writers: ``(workdir=, is_primary=) -> MetricWriter`` (``@flame_gin.metric_writers``).
      checkpointer: checkpoint settings (``@flame_gin.checkpointer()``, checked in the plan phase and opened on
        ``workdir/checkpoints`` once the run directory is written); None: no checkpoints.
      profiler: ``(workdir=, rank=) -> Profiler`` (``@flame_gin.profiler``); None: no traces.
      parallel_dims: ``(world_size=) -> ParallelDims`` (``@flame_gin.ParallelDims``); None: all data parallel.
      parallelize: ``(model, dims=, mesh=)`` applying TP -> AC -> compile -> FSDP (``@flame_gin.parallelize``).
      pipeline: with ``pp > 1``, ``@flame_gin.build_pipeline``: splits the model into stages, builds the schedule.
      init_timeout_seconds: collectives' timeout until the first step is done (compilation, autotuning).
      train_timeout_seconds: collectives' timeout after the first step (None: unchanged).
      nccl_trace_buffer_size: NCCL flight recorder entries (None: the environment's setting).
      compile_cache: keep compiled blocks' artifacts in the workdir after the first step; load them on resume.
      kernel_cache: keep FLA's Triton kernels and autotuning choices in ``workdir/kernel_cache``, so a resumed
        run skips autotuning and runs the same kernel configurations.
      kernel_choices_from: an earlier run directory (or Triton cache folder) of the same shapes whose autotuning
        choices a new run starts from: on a GPU, Triton compiles the chosen kernels instead of timing them all.
      config_text: the resolved config, written to ``workdir/config.gin`` and beside the curves.
      on_first_step: returns the operative config, written after the first step (what gin really used).
      stop_requested: polled every step; True saves and returns ``REQUEUE_EXIT_CODE``.
    """
    start = start or start_lib.Start()
    evaluation = evaluation if evaluation is not None and evaluation.interval else None
    downstream = downstream_lib.for_run(downstream, workdir=workdir)
    # 1. Set up the process, then validate everything cheap before building anything big.
    plan = assembly.plan(
        model_config=model_config,
        lr_schedule=lr_schedule,
        parallel_dims=parallel_dims,
        pipeline=pipeline,
        workdir=workdir,
        numbers=dict(
            train_steps=train_steps,
            batch_size=batch_size,
            grad_accum_steps=grad_accum_steps,
            seq_len=seq_len,
            lr=optimizer.lr,
            varlen=varlen,
        ),
        evaluation=evaluation,
        checkpointer=checkpointer,
        kernel_mode=kernel_mode,
        downstream=downstream,
        fused_loss=fused_loss,
        init_timeout_seconds=init_timeout_seconds,
        train_timeout_seconds=train_timeout_seconds,
        nccl_trace_buffer_size=nccl_trace_buffer_size,
        kernel_choices_from=kernel_choices_from,
        host_collectives=bool(config_lib.bound_keyword(parallelize, "cpu_offload", False)),
    )
    process.seed_everything(seed=seed, deterministic=deterministic)
    proc, dims = plan.proc, plan.dims
    # 2. Data (fails early on bad paths), then the vocabulary check; 3. the model on the meta device.
    loaders = assembly.data(
        plan=plan, train_data=train_data, eval_data=evaluation.data if evaluation else None, seed=seed
    )
    n_params = assembly.meta_model(plan=plan)
    # 4. Run directory: only now that the config is known to be sound (the checkpoint settings were checked in 1).
    workdir_path = pathlib.Path(workdir)
    fresh = not workdir_path.exists()
    ckpt = checkpointer.open(directory=str(workdir_path / "checkpoints")) if checkpointer is not None else None
    if proc.is_primary:
        config_lib.write_config(workdir=workdir_path, text=config_text)
    writer = writers(workdir=workdir_path, is_primary=proc.is_primary)
    if proc.device.type == "cuda":  # before any Triton kernel compiles
        kernels.cache.prepare(workdir=workdir_path, in_run_dir=kernel_cache, choices=plan.kernel_choices)
    # 5. Model materialised, initialised with the seed and parallelised; the optimizer with its groups.
    # The compile cache loads before any block is compiled (at its first call); a run that loaded it keeps it.
    save_compiled = compile_cache and not compile_lib.load_compile_cache(workdir=workdir_path)
    try:
        built = assembly.build(
            plan=plan,
            seed=seed,
            parallelize=parallelize,
            pipeline=pipeline,
            init_timeout_seconds=init_timeout_seconds,
            restoring=start.resumes(ckpt=ckpt),
        )
        opt = assembly.optimizer(
            built=built, settings=optimizer, device=proc.device, steps_follow=not start.seed_checkpoint_only
        )
    except config_lib.ConfigError:
        _clear_new_run_dir(fresh=fresh, is_primary=proc.is_primary, workdir=workdir_path, ckpt=ckpt, writer=writer)
        raise
    assembly.describe(plan=plan, model=built.model, n_params=n_params, writer=writer, config_text=config_text)
    # 6. Start: resume the run's own checkpoint, or warm-start weights, or keep the seeded initialisation.
    if start.seed_checkpoint_only:
        start_lib.save_seed(workdir=workdir_path, model=built.model, config_text=config_text)
        return _finish(ckpt=ckpt, prof=None, writer=writer, status=0)
    restored = start.resume_or_initialise(ckpt=ckpt, model=built.model, optimizer=opt, loader=loaders[0])
    if restored is not None:  # what build_model left to the checkpoint must have come from it
        try:
            models.check_restored(model=built.model)
        except ValueError as e:
            raise checkpoint.CheckpointError(f"step {restored['step']}: {e}") from None
    prof = profiler(workdir=str(workdir_path), rank=proc.rank) if profiler is not None else None
    # 7. The loop; 8. the final save, flush, shut down.
    loop = loop_lib.Loop(
        state=loop_lib.TrainState(**restored) if restored else loop_lib.TrainState(),
        built=built,
        optimizer=opt,
        loader=loaders[0],
        eval_loader=loaders[1],
        writer=writer,
        ckpt=ckpt,
        prof=prof,
        device=proc.device,
        is_primary=proc.is_primary,
        world_size=proc.world_size,
        dp_rank=dims.dp_rank(rank=proc.rank),
        train_steps=train_steps,
        lr=optimizer.lr,
        lr_schedule=plan.lr_schedule,
        grad_accum_steps=grad_accum_steps,
        max_grad_norm=max_grad_norm,
        skip_nonfinite=skip_nonfinite,
        log_interval=log_interval,
        evaluation=evaluation,
        downstream=downstream,
        gc_interval=gc_interval,
        flops_per_token=flops.training_flops_or_none(config=plan.model_config, seq_len=seq_len),
        peak_tflops=flops.device_peak_tflops(device=proc.device, configured=peak_tflops),
        config_text=config_text,
        stop_requested=stop_requested,
    )
    # The primary logs while the first step compiles and autotunes, then its duration (flame_gin.first_step).
    watch = first_step.Watch(enabled=proc.is_primary)
    after_first_step = functools.partial(
        _after_first_step,
        is_primary=proc.is_primary,
        workdir=workdir_path,
        on_first_step=on_first_step,
        save_compiled=save_compiled,
        train_timeout_seconds=train_timeout_seconds,
        groups=built.mesh_groups,
        watch=watch,
        headroom=functools.partial(
            _warn_if_near_full,
            device=proc.device,
            model=built.model,
            micro_batch=plan.micro_batch,
            grad_accum_steps=grad_accum_steps,
        ),
    )
    watch.start()
    try:
        status = loop.run(after_first_step=after_first_step)
    except torch.OutOfMemoryError as err:
        raise _out_of_memory(err=err, loop=loop, plan=plan, ckpt=ckpt, writer=writer, seq_len=seq_len) from err
    finally:
        watch.stop(completed=False)  # the loop failed before its first step ended, or nothing is left to stop
    return _finish(ckpt=ckpt, prof=prof, writer=writer, status=status)


def _warn_if_near_full(*, device, model, micro_batch: int, grad_accum_steps: int) -> None:
    """On a GPU, a warning when the first step's peak allocation leaves under 10% of the device's memory."""
    capacity = process.device_capacity(device)
    if capacity is None:
        return
    warning = out_of_memory.headroom_warning(
        peak_gib=process.peak_memory_gib(device),
        capacity_gib=capacity / 2**30,
        checkpointed=out_of_memory.checkpointed_blocks(model),
        micro_batch=micro_batch,
        grad_accum_steps=grad_accum_steps,
    )
    if warning:
        logging.warning(warning)


def _out_of_memory(*, err, loop, plan, ckpt, writer, seq_len: int) -> out_of_memory.OutOfDeviceMemory:
    """Phase, when the device ran out of memory: the metrics written so far are flushed and the save in flight
    finishes (its state precedes the failing step), then the error names the step, the micro-batch, the
    newest committed checkpoint and the settings that lower memory (`flame_gin.out_of_memory`)."""
    writer.flush()
    if ckpt is not None:
        ckpt.wait()
    return out_of_memory.describe(
        error=err,
        in_step=loop.in_step,
        step=loop.state.step,
        micro_batch=plan.micro_batch,
        seq_len=seq_len,
        grad_accum_steps=loop.grad_accum_steps,
        checkpointed=out_of_memory.checkpointed_blocks(loop.built.model),
        device=plan.proc.device,
        rank=plan.proc.rank,
        world_size=plan.proc.world_size,
        last_checkpoint=ckpt.latest_step() if ckpt is not None else None,
    )


def _clear_new_run_dir(*, fresh: bool, is_primary: bool, workdir: pathlib.Path, ckpt, writer) -> None:
    """Phase, on a config error while building (phase 5: states beyond the GPU, a parallelism the run cannot
    apply): a run directory that this run created in phase 4 holds only its config and empty folders, so the
    primary removes it, as a config error in phases 1-3 leaves none. An existing run's directory (a resume) is
    left as it was."""
    writer.close()
    if ckpt is not None:
        ckpt.close()
    if fresh and is_primary:
        shutil.rmtree(workdir, ignore_errors=True)


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
