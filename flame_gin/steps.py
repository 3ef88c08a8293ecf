"""One training step's work, in the variants the mesh asks for: whole-model forward/backward or a pipeline
schedule, gradient clipping within one stage or across pipeline stages, the optimizer step, and evaluation.

The loss of every variant is the sum of token losses divided by the step's global count of valid tokens (over
data and context ranks and every micro-batch), so a step equals the same step on one process. A pipelined rank
holds only its stages: ``flame_gin.parallel.pipeline`` gives them one module under the unsplit model's parameter
names, which the optimizer, the clipping and the checkpointer see as "the model".
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from flame_gin import loss as loss_lib
from flame_gin import process
from flame_gin.parallel import fsdp


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on CPU (fp32, deterministic)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fetch(iterator: Iterator[dict], *, count: int, device: torch.device) -> tuple[list[dict], int, float]:
    """The step's micro-batches, moved to the device; returns them, their valid-label count (counted on the
    host before the copy, so no device read-back) and the time spent waiting."""
    start = time.perf_counter()
    batches, tokens = [], 0
    for _ in range(count):
        batch = next(iterator)
        tokens += valid_tokens([batch])
        batches.append({k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()})
    return batches, tokens, time.perf_counter() - start


def valid_tokens(batches: list[dict]) -> int:
    """Labels that count in the loss: counted in host memory with numpy for host tensors (no tensor read-back),
    a device read-back when the labels live on the GPU (context parallel's sliced batches)."""
    return sum(
        int(np.count_nonzero(b["labels"].numpy() != loss_lib.IGNORE_INDEX))
        if b["labels"].device.type == "cpu"
        else int((b["labels"] != loss_lib.IGNORE_INDEX).sum())
        for b in batches
    )


def global_tokens(*, local: int, device: torch.device, group) -> int | torch.Tensor:
    """The step's valid-label count over ``group`` (data and context ranks): the int itself on one rank; on
    several, the all-reduced count as an int64 device tensor, never read back here (the loss divides by it on
    the device; ``StepTally`` reads it with the logged values). The count reaches the device as a fill
    kernel's argument (``torch.full``): ``torch.tensor(local, device=...)`` would copy it from host memory,
    which on a GPU waits for the stream, i.e. for the previous step to finish."""
    if process.group_size(group) == 1:
        return local
    return process.all_reduce_sum(torch.full((), local, dtype=torch.int64, device=device), group=group)


def forward_backward(
    *,
    model,
    batches: list[dict],
    tokens: int | torch.Tensor,
    device: torch.device,
    loss_fn: Callable[..., tuple],
    group=None,
) -> torch.Tensor:
    """Gradients of the loss normalised by ``tokens``, the global number of valid tokens of the step; returns
    the global mean loss as a device tensor (read back only when logged).

    Losses are summed over ``group`` (the data and context ranks; None = every process). Gradients are reduced
    on the last micro-batch only (a no-op without FSDP).
    """
    denom = tokens.clamp(min=1).float() if torch.is_tensor(tokens) else max(tokens, 1)
    total = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        fsdp.set_gradient_sync(model, sync=i == len(batches) - 1)
        with autocast(device):
            loss_sum, _ = loss_fn(model=model, batch=batch)
        (loss_sum / denom).backward()
        total += loss_sum.detach().float()
    return process.all_reduce_sum(total, group=group) / denom


def pipeline_forward_backward(
    *, runtime, batches: list[dict], tokens: int | torch.Tensor, device: torch.device, group
) -> torch.Tensor:
    """``forward_backward`` through a pipeline schedule (``flame_gin.parallel.pipeline``): each accumulated
    micro-batch is one schedule step (itself split into the schedule's micro-batches); the loss share that every
    pipeline rank gets back is summed over ``group`` (data ranks) into the global mean."""
    from flame_gin.parallel.pipeline import pipeline_step

    count = tokens.float() if torch.is_tensor(tokens) else torch.full((), float(tokens), device=device)
    total = torch.zeros((), device=device)
    for batch in batches:
        with autocast(device):
            total += pipeline_step(
                runtime, input_ids=batch["input_ids"], labels=batch["labels"], global_tokens=count
            ).to(device)
    return process.all_reduce_sum(total, group=group)


def clip_grad_norm(*, model, max_grad_norm: float, device: torch.device, pp_group=None) -> torch.Tensor:
    """The global gradient norm as a tensor on ``device`` (clipped to ``max_grad_norm`` when it is positive).

    With ``pp_group`` (pipeline ranks) the norm covers every stage: each rank's squared norm is summed over the
    group before the common clipping factor is applied. Under FSDP's CPU offload the gradients, and so their
    norm, are on the host: the norm comes back on ``device`` anyway, where the loss is, so that the step's
    values stay together until they are logged.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    if pp_group is None:
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).float().to(device)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).float()
    squared = norm**2
    dist.all_reduce(squared, group=pp_group)
    total = squared.sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, limit, total)
    return total.to(device)


def apply(
    *, optimizer, lr_now: float, loss: torch.Tensor, grad_norm: torch.Tensor, skip_nonfinite: bool
) -> torch.Tensor:
    """The optimizer step at ``lr_now``; with ``skip_nonfinite`` a step whose loss or gradient norm is not finite
    is dropped. Returns 1.0 (skipped) or 0.0 as a device tensor.

    A fused AdamW drops the step on the device (its ``found_inf`` input, as under a gradient scaler: no
    parameter, moment or step-count change), so the host never waits for the GPU; other optimizers read the
    flag back. Under FSDP's CPU offload the fused step runs on the host: the flag is copied there first, and
    waited for (torch's own copy of it would not be: the host kernel could read the flag before it lands).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr_now
    bad = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float() if skip_nonfinite else None
    if bad is not None and optimizer.defaults.get("fused"):
        optimizer.found_inf = bad.to(_parameters_device(optimizer))
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bad is None or not bool(bad):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return bad if bad is not None else torch.zeros((), device=loss.device)


def _parameters_device(optimizer) -> torch.device:
    """Where the optimizer's parameters, and so its fused step, are (a fused optimizer keeps them together)."""
    return next(p.device for group in optimizer.param_groups for p in group["params"])


class StepTally:
    """The last step's loss and gradient norm, the count of skipped steps and the tokens trained, kept on the
    device and read back (one host synchronisation) only when they are logged or checkpointed."""

    def __init__(self, *, device: torch.device):
        self._skipped = torch.zeros((), device=device)
        self._tokens = torch.zeros((), dtype=torch.int64, device=device)
        self._host_tokens = 0
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def add(
        self, *, loss: torch.Tensor, grad_norm: torch.Tensor, skipped: torch.Tensor, tokens: int | torch.Tensor = 0
    ) -> None:
        self._skipped += skipped
        if torch.is_tensor(tokens):
            self._tokens += tokens
        else:
            self._host_tokens += tokens
        self._last = (loss, grad_norm)

    def read(self) -> tuple[float, float, int, int]:
        """(last loss, last gradient norm, steps skipped and tokens trained since the last read)."""
        # No step yet (a finished run started again): NaN, on the device like the counts it is stacked with.
        loss, norm = self._last if self._last is not None else (self._skipped.new_full((), math.nan),) * 2
        values = torch.stack(
            [loss.double(), norm.double(), self._skipped.double(), self._tokens.double()]
        ).tolist()  # float64: token counts exact below 2**53
        tokens = int(values[3]) + self._host_tokens
        self._skipped.zero_()
        self._tokens.zero_()
        self._host_tokens = 0
        return values[0], values[1], int(values[2]), tokens


class StopVote:
    """Whether any rank was asked to stop, agreed by every rank at the same step without stalling the device.

    Each step all-reduces this rank's flag and copies the sum into host memory (pinned, asynchronously on a
    GPU); the sum of step ``s`` is read at step ``s + 1``, by when the device has long computed it, so the host
    never waits for the step in flight. Every rank reads the same sum at the same step, so all of them save and
    leave together, one step after the signal. One process needs no collective and answers at once.
    """

    def __init__(self, *, stop_requested: Callable[[], bool] | None, device: torch.device, world_size: int):
        self._requested, self._device, self._world = stop_requested, device, world_size
        self._host = torch.zeros((), pin_memory=device.type == "cuda")
        self._event = None

    def poll(self) -> bool:
        local = self._requested is not None and self._requested()
        if self._world == 1:
            return local
        decided = False
        if self._event is not None:  # the previous step's sum
            if self._event is not True:
                self._event.synchronize()
            decided = bool(self._host.numpy() > 0)
        flag = process.all_reduce_sum(torch.full((), float(local), device=self._device))
        self._host.copy_(flag, non_blocking=self._device.type == "cuda")
        if self._device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._event = True
        return decided


@torch.no_grad()
def evaluate(
    *,
    model,
    loader,
    device: torch.device,
    max_batches: int,
    loss_fn: Callable[..., tuple],
    prepare: Callable[[dict], dict] = lambda batch: batch,
    group=None,
) -> dict:
    """Mean token loss and perplexity over the held-out loader (at most ``max_batches`` batches)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        batch = prepare({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()})
        with autocast(device):
            loss_sum, n = loss_fn(model=model, batch=batch)
        total += loss_sum.float()
        count += n
    model.train(was_training)
    total, count = process.all_reduce_sum(total, group=group), process.all_reduce_sum(count, group=group)
    mean = float(total / count.clamp(min=1))
    return {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50.0))}
