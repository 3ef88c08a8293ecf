"""The training loop: each step runs the phases train -> log -> evaluate -> checkpoint or stop -> housekeeping.

Why a class: the phases share the run's built parts (model, optimizer, loaders, loss, writer, checkpointer)
and its counters. Holding them once keeps each phase one short method and the loop itself a few readable
lines (``Loop.run``), instead of closures that capture the run's locals. ``flame_gin.trainer.run`` builds
the parts and hands them over; nothing here reads a config.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Any, Callable

import torch
from absl import logging

from flame_gin import flops, metrics, process, steps
from flame_gin.checkpoint import REQUEUE_EXIT_CODE


@dataclasses.dataclass(frozen=True, kw_only=True)
class Evaluation:
    """The held-out evaluation's settings (gin: ``flame_gin.evaluation``; the run takes
    ``@flame_gin.evaluation()``, or None for no evaluation).

    ``data`` builds the held-out loader (called like the training one, with ``split="validation"``), the loss
    is measured every ``interval`` steps and at the last (0: never) over at most ``batches`` batches.
    """

    data: Callable[..., Any]
    interval: int = 1000
    batches: int = 50


class HeldOutBatches:
    """The held-out batches, read at the first evaluation and kept on the host for the later ones.

    Why: every evaluation scores the same batches (the validation loader restarts at its beginning each time),
    and reading them is what costs: a held-out share of a streamed source is found by hashing every document
    from the split's start (about 200 read per held-out one at a 0.5% share, from the hub). ``max_batches``
    (``Evaluation.batches``, at least 1) bounds what is kept: batches x rows x sequence length tokens, a few
    MB at the usual settings.
    """

    def __init__(self, *, loader, max_batches: int):
        self._loader, self._max_batches, self._kept = loader, max_batches, None

    def __iter__(self):
        if self._kept is not None:
            yield from self._kept
            return
        kept = []
        for batch in self._loader:
            if len(kept) == self._max_batches:
                break
            kept.append(batch)
            yield batch
        self._kept = kept


@dataclasses.dataclass
class TrainState:
    """What the loop counts, saved in every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0


@dataclasses.dataclass(kw_only=True)
class Loop:
    """The run's parts and settings, as the loop's phases use them."""

    state: TrainState
    built: Any  # ``assembly.Built``: the model, its loss, its pipeline runtime (or None) and its process groups
    optimizer: torch.optim.Optimizer
    loader: Any
    eval_loader: Any | None
    writer: metrics.MetricWriter
    ckpt: Any | None
    prof: Any | None
    device: torch.device
    is_primary: bool
    world_size: int
    dp_rank: int
    train_steps: int
    lr: float
    lr_schedule: Callable[[int], float]
    grad_accum_steps: int
    max_grad_norm: float
    skip_nonfinite: bool
    log_interval: int
    evaluation: Evaluation | None  # its ``interval`` and ``batches`` (the loader is ``eval_loader``)
    downstream: Any | None  # ``downstream.Downstream``: harness tasks on the model being trained
    gc_interval: int
    flops_per_token: float | None
    peak_tflops: float | None
    config_text: str
    stop_requested: Callable[[], bool] | None

    def __post_init__(self) -> None:
        self._iterator = iter(self.loader)
        self._tally = steps.StepTally(device=self.device)
        self._stop_vote = steps.StopVote(
            stop_requested=self.stop_requested, device=self.device, world_size=self.world_size
        )
        self._start_step, self._start_time = self.state.step, time.monotonic()
        self._window_tokens, self._window_start = self.state.tokens_seen, time.perf_counter()
        self._held_out, self.in_step = None, False
        if self.eval_loader is not None:
            self._held_out = HeldOutBatches(loader=self.eval_loader, max_batches=self.evaluation.batches)

    def run(self, *, after_first_step: Callable[[], None]) -> int:
        """Steps to ``train_steps``; 0, or ``REQUEUE_EXIT_CODE`` when a requested stop was saved."""
        if self.gc_interval > 0:
            gc.disable()
        status = 0
        while self.state.step < self.train_steps:
            self.in_step = True  # what a failure interrupted: the step itself, or the phases after it
            lr_now, step_start, data_wait = self.train_step()
            self.in_step = False
            if self.state.step == self._start_step + 1:
                after_first_step()
            self.log(lr_now=lr_now, step_start=step_start, data_wait=data_wait)
            self.evaluate()
            self.evaluate_downstream()
            if self.checkpoint_or_stop():
                status = REQUEUE_EXIT_CODE
                break
            self.housekeeping()
        if self.ckpt is not None and status == 0 and self.state.step > 0:
            self.save(final=True)
        self.read_tally()  # warns about skipped steps not yet logged
        gc.enable()
        return status

    def train_step(self) -> tuple[float, float, float]:
        """Phase: fetch micro-batches -> forward/backward -> clip -> optimizer step; nothing read back."""
        step_start = time.perf_counter()
        batches, local_tokens, data_wait = steps.fetch(self._iterator, count=self.grad_accum_steps, device=self.device)
        if self.built.prepare is not None:  # each context rank keeps its slice of the sequence: count what it kept
            batches = [self.built.prepare(b) for b in batches]
            local_tokens = steps.valid_tokens(batches)
        tokens = steps.global_tokens(local=local_tokens, device=self.device, group=self.built.group)
        if self.built.runtime is None:
            loss = steps.forward_backward(
                model=self.built.model,
                batches=batches,
                tokens=tokens,
                device=self.device,
                loss_fn=self.built.loss_fn,
                group=self.built.group,
            )
        else:
            loss = steps.pipeline_forward_backward(
                runtime=self.built.runtime, batches=batches, tokens=tokens, device=self.device, group=self.built.group
            )
        grad_norm = steps.clip_grad_norm(
            model=self.built.model, max_grad_norm=self.max_grad_norm, device=self.device, pp_group=self.built.pp_group
        )
        lr_now = self.lr * self.lr_schedule(self.state.step)
        skipped = steps.apply(
            optimizer=self.optimizer, lr_now=lr_now, loss=loss, grad_norm=grad_norm, skip_nonfinite=self.skip_nonfinite
        )
        self._tally.add(loss=loss, grad_norm=grad_norm, tokens=tokens, skipped=skipped)
        self.state.step += 1
        return lr_now, step_start, data_wait

    def read_tally(self) -> tuple[float, float]:
        """The device's step values, read back: only at logging, saving and the end."""
        loss_value, grad_norm_value, skipped, tokens = self._tally.read()
        self.state.tokens_seen += tokens
        if skipped:
            logging.warning(
                "%d step(s) up to step %d skipped: non-finite loss or gradient norm (last loss %s, grad norm %s)",
                skipped,
                self.state.step,
                loss_value,
                grad_norm_value,
            )
        self.state.skipped_steps += skipped
        return loss_value, grad_norm_value

    def log(self, *, lr_now: float, step_start: float, data_wait: float) -> None:
        """Phase: every ``log_interval`` steps and at the last, the only per-step read-back of device values."""
        step = self.state.step
        if not self.log_interval or (step % self.log_interval and step != self.train_steps):
            return
        loss_value, grad_norm_value = self.read_tally()
        elapsed = time.perf_counter() - self._window_start
        tokens_per_second = (self.state.tokens_seen - self._window_tokens) / max(elapsed, 1e-9)
        scalars = {
            "loss": loss_value,
            "lr": lr_now,
            "grad_norm": grad_norm_value,
            "tokens_per_second": tokens_per_second,
            "tokens_seen": self.state.tokens_seen,
            "step_time": time.perf_counter() - step_start,
            "data_wait_time": data_wait,
            "peak_memory_gib": process.peak_memory_gib(self.device),
            "skipped_steps": self.state.skipped_steps,
        }
        if self.flops_per_token and self.peak_tflops:
            scalars["mfu"] = flops.mfu(
                tokens_per_second=tokens_per_second,
                flops_per_token=self.flops_per_token,
                peak_tflops=self.peak_tflops,
                devices=self.world_size,
            )
        for source, count in getattr(self.loader, "tokens_per_source", {}).items():
            scalars[f"data/tokens/{source}"] = count
        self.writer.write_scalars(step, scalars)
        if self.is_primary:
            steps_per_second = (step - self._start_step) / max(time.monotonic() - self._start_time, 1e-9)
            eta = (self.train_steps - step) / max(steps_per_second, 1e-9)
            logging.info(
                metrics.format_progress(step=step, total_steps=self.train_steps, scalars=scalars, eta_seconds=eta)
            )
        self._window_tokens, self._window_start = self.state.tokens_seen, time.perf_counter()

    def evaluate(self) -> None:
        """Phase: every ``evaluation.interval`` steps and at the last, the held-out loss (``Evaluation``)."""
        step = self.state.step
        if self.eval_loader is None or (step % self.evaluation.interval and step != self.train_steps):
            return
        results = steps.evaluate(
            model=self.built.model,
            loader=self._held_out,
            device=self.device,
            max_batches=self.evaluation.batches,
            loss_fn=self.built.loss_fn,
            prepare=self.built.prepare or (lambda batch: batch),
            group=self.built.group,
        )
        self.writer.write_scalars(step, results)

    def evaluate_downstream(self) -> None:
        """Phase: every ``downstream.interval`` steps and at the last, the downstream tasks (``Downstream``)."""
        step = self.state.step
        if self.downstream is not None and self.downstream.due(step=step, last_step=self.train_steps):
            self.writer.write_scalars(step, self.downstream.run(model=self.built.model, step=step, device=self.device))

    def checkpoint_or_stop(self) -> bool:
        """Phase: save when due (or when a stop was requested); True when the loop must stop for a requeue."""
        preempted = self._stop_vote.poll()
        if self.ckpt is not None and self.state.step < self.train_steps and self.save(final=preempted):
            self.writer.write_scalars(self.state.step, {"checkpoint/blocked_seconds": self.ckpt.last_blocked_seconds})
        if preempted and self.state.step < self.train_steps:  # at the last step the final save is the stop
            logging.warning(
                "stop requested: state saved at step %d, exiting with %d", self.state.step, REQUEUE_EXIT_CODE
            )
            return True
        return False

    def housekeeping(self) -> None:
        """Phase: a young-generation GC at a fixed cadence (automatic GC is off), the profiler's step."""
        if self.gc_interval > 0 and self.state.step % self.gc_interval == 0:
            gc.collect(1)
        if self.prof is not None:
            self.prof.step(self.state.step)

    def save(self, *, final: bool = False) -> bool:
        """Checkpoints model, optimizer and this rank's run state when due (always when ``final``); True when
        it saved. The checkpointer gathers every rank's ``extra`` (data-iterator and RNG states)."""
        if self.ckpt is None or not (final or self.ckpt.should_save(step=self.state.step)):
            return False
        self.read_tally()
        extra = {
            "train_state": dataclasses.asdict(self.state),
            "data": self.loader.state_dict(),
            "rng": process.rng_state(),
            "dp_rank": self.dp_rank,
        }
        return bool(
            self.ckpt.save(
                step=self.state.step,
                model=self.built.model,
                optimizer=self.optimizer,
                extra=extra,
                config_text=self.config_text,
                force=True,
            )
        )
