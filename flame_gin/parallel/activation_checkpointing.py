"""Activation checkpointing per block: none, full (every `every`-th block) or selective (keep matmul outputs).

Applied after tensor parallel and before compile/FSDP so that recomputation replays the sharded forward and
FSDP's all-gather hooks sit outside the checkpointed region.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.linear.default,
}
MODES = ("none", "full", "selective")


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(
    blocks: nn.ModuleList | nn.ModuleDict, *, mode: str = "full", every: int = 1
) -> None:
    """Wraps blocks of `blocks` (in place) with checkpointing. `mode` in MODES; `every`: wrap every n-th block
    (full mode only)."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing: mode={mode!r}; expected one of {MODES}")
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"activation checkpointing: every={every!r} must be an integer >= 1")
    if mode == "none":
        return
    keys = list(blocks.keys()) if isinstance(blocks, nn.ModuleDict) else list(range(len(blocks)))
    for i, key in enumerate(keys):
        if mode == "full" and i % every:
            continue
        block = blocks[key]
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            wrapped = checkpoint_wrapper(
                block,
                preserve_rng_state=False,
                context_fn=lambda: create_selective_checkpoint_contexts(_selective_policy),
            )
        blocks[key] = wrapped
