"""A run that runs out of device memory ends with one message saying where, what was kept, and what lowers memory.

Why: torch's out-of-memory error arrives as a long traceback from inside autograd or an FLA kernel, often
minutes into a run (after the first step's autotuning), and says nothing about the run: which step, which
micro-batch, whether the blocks were already checkpointed, what was saved. The trainer catches it around the
loop, lets the checkpoint save in flight finish and the metrics written so far reach disk (nothing the run had
done before the failing step is lost), and raises `OutOfDeviceMemory` with that context and the settings that
lower memory; the command line prints it without a traceback and exits 1. A first step that leaves under 10% of
the device free gets the same settings in a warning (`headroom_warning`), before the run gets that far.
"""

from __future__ import annotations

import torch
from torch import nn

from flame_gin import process


class OutOfDeviceMemory(RuntimeError):
    """A training run ran out of device memory; the text names the step, the micro-batch and the ways out."""


def checkpointed_blocks(model: nn.Module) -> int:
    """How many modules of ``model`` recompute their forward in the backward (activation checkpointing)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    return sum(isinstance(module, CheckpointWrapper) for module in model.modules())


def describe(
    *,
    error: BaseException,
    in_step: bool,
    step: int,
    micro_batch: int,
    seq_len: int,
    grad_accum_steps: int,
    checkpointed: int,
    device: torch.device,
    rank: int,
    world_size: int,
    last_checkpoint: int | None,
) -> OutOfDeviceMemory:
    """The error to raise. ``in_step``: the failure came from the forward/backward/optimizer of step ``step`` + 1
    (else from what follows step ``step``: logging, evaluation, checkpointing); ``checkpointed``: the count
    `checkpointed_blocks` gives; ``last_checkpoint``: the newest committed step, or None."""
    where = f"in step {step + 1}" if in_step else f"after step {step} (logging, evaluation or checkpointing)"
    rank_part = f"rank {rank} of {world_size}, " if world_size > 1 else ""
    lines = str(error).strip().splitlines()
    torch_says = lines[0] if lines else type(error).__name__
    sentences = [
        f"out of device memory {where} ({rank_part}micro-batch {micro_batch} x {seq_len} tokens, "
        f"{checkpointed or 'no'} block(s) checkpointed): {torch_says}"
    ]
    capacity = process.device_capacity(device)
    if capacity is not None:
        sentences.append(
            f"The device holds {capacity / 2**30:.1f} GiB; this process's peak allocation was "
            f"{process.peak_memory_gib(device):.1f} GiB"
        )
    sentences.append(_ways_out(checkpointed=checkpointed, micro_batch=micro_batch, grad_accum_steps=grad_accum_steps))
    sentences.append(
        f"The newest committed checkpoint is step {last_checkpoint}: the same command with one of these settings "
        "resumes from it"
        if last_checkpoint is not None
        else "No checkpoint was committed"
    )
    return OutOfDeviceMemory(". ".join(sentence.rstrip(".") for sentence in sentences) + ".")


NEAR_FULL = 0.9  # share of the device's memory above which the first step's peak is worth a warning


def headroom_warning(
    *, peak_gib: float, capacity_gib: float, checkpointed: int, micro_batch: int, grad_accum_steps: int
) -> str | None:
    """A warning when the first step's peak allocation is within 10% of the device's memory, else None.

    Why: the first step sets the run's peak for fixed shapes, but an evaluation batch, a longer packed document
    or the allocator's fragmentation can ask for more later, and running out then costs the work since the last
    checkpoint; RWKV-7-340M at 16 x 2048 peaked at 75.2 of an H100's 79.2 GiB."""
    share = peak_gib / capacity_gib
    if share < NEAR_FULL:
        return None
    return (
        f"the first step's peak allocation is {peak_gib:.1f} GiB of the device's {capacity_gib:.1f} GiB "
        f"({share:.0%}): little is left for an evaluation batch or allocator fragmentation. "
        + _ways_out(checkpointed=checkpointed, micro_batch=micro_batch, grad_accum_steps=grad_accum_steps)
        + "."
    )


def _ways_out(*, checkpointed: int, micro_batch: int, grad_accum_steps: int) -> str:
    """The settings that lower a run's memory, the ones that apply to it first."""
    ways = []
    if not checkpointed:
        ways.append(
            "recompute every block in the backward, --gin_file=gin/parallel/checkpointing.gin "
            "(gin/parallel/memory_saving.gin also compiles the blocks, which pays for GLA and DeltaNet)"
        )
    if micro_batch % 2 == 0:
        ways.append(
            f"half the micro-batch at the same global batch, --gin.flame_gin.run.grad_accum_steps={2 * grad_accum_steps}"
        )
    ways.append("parameters, gradients and optimizer states sharded over more GPUs (gin/parallel/fsdp.gin)")
    return "What lowers memory: " + "; ".join(ways)
