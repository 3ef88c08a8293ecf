"""Cross-entropy normalised by the global count of valid tokens.

Each rank returns `sum of its token losses / valid tokens over all data and context ranks` and gradients are
summed (not averaged) over those ranks (`fsdp.apply_data_parallel` sets FSDP's divide factor to 1), so the
update equals that of the global token mean whatever the split of documents, padding or sequence slices
across ranks and micro-batches. Vocabulary-sharded logits (loss parallel) are handled here with explicit
collectives (max, sum of exponentials, target logit), so `backward()` needs no special context and the full
logits are never gathered.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from flame_gin.data.packing import IGNORE as IGNORE_INDEX  # the data's label for "no target"


def global_valid_tokens(*, labels: list[torch.Tensor] | torch.Tensor, group=None) -> torch.Tensor:
    """Valid (label != -100) tokens of all `labels` (one step's micro-batches) summed over `group` (the
    `dp_cp` mesh group; None for a single process). Returns a float64 scalar, identical on every rank."""
    items = labels if isinstance(labels, (list, tuple)) else [labels]
    count = sum((x != IGNORE_INDEX).sum() for x in items).to(torch.float64).reshape(())
    if group is not None and dist.is_initialized():
        dist.all_reduce(count, group=group)
    return count


class _SumAcrossShards(torch.autograd.Function):
    """All-reduce (sum) whose backward is the identity: every rank computes the same loss from the sum, and
    each rank's gradient is already exact for its own shard."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _vocab_parallel_loss_sum(logits: DTensor, labels: torch.Tensor) -> torch.Tensor:
    if len(logits.placements) != 1 or not logits.placements[0].is_shard(logits.ndim - 1):
        raise ValueError(f"loss parallel: logits must be sharded on the vocabulary only, got {logits.placements}")
    mesh = logits.device_mesh
    group, rank = mesh.get_group(), mesh.get_local_rank()
    vocab = logits.shape[-1]
    if vocab % mesh.size():
        raise ValueError(f"loss parallel: vocabulary {vocab} not divisible by tensor-parallel size {mesh.size()}")
    local = logits.to_local().flatten(0, -2).float()
    labels = labels.flatten().to(local.device)
    width = local.shape[-1]
    start = rank * width
    with torch.no_grad():
        peak = local.max(dim=-1).values
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    shifted = local - peak[:, None]
    lse = _SumAcrossShards.apply(shifted.exp().sum(-1), group).log()
    valid = labels != IGNORE_INDEX
    mine = valid & (labels >= start) & (labels < start + width)
    index = torch.where(mine, labels - start, torch.zeros_like(labels))
    target = shifted.gather(-1, index[:, None]).squeeze(-1) * mine
    target = _SumAcrossShards.apply(target, group)
    return ((lse - target) * valid).sum()


def token_loss_sum(*, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies (fp32), ignoring -100; accepts vocabulary-sharded DTensor logits. On GPU,
    whole logits go to FLA's Triton cross-entropy (no fp32 copy; the plain path's default, `flame_gin.fused`)."""
    if isinstance(logits, DTensor):
        return _vocab_parallel_loss_sum(logits, labels)
    if logits.is_cuda:
        from flame_gin import fused

        return fused.logits_loss_sum(logits=logits, labels=labels)
    return F.cross_entropy(
        logits.flatten(0, -2).float(), labels.flatten().to(logits.device), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def normalized_loss(*, logits: torch.Tensor, labels: torch.Tensor, global_tokens: torch.Tensor) -> torch.Tensor:
    """This rank's share of the global token-mean loss: call `.backward()` on it; summing it over the data
    and context ranks (and micro-batches) gives the global mean."""
    return token_loss_sum(logits=logits, labels=labels) / global_tokens.clamp_min(1).to(torch.float32)


def reduce_for_logging(*, loss_share: torch.Tensor, group=None) -> float:
    """Global mean loss from each rank's share (an all-reduce; for logging only)."""
    value = loss_share.detach().to(torch.float64).clone()
    if group is not None and dist.is_initialized():
        dist.all_reduce(value, group=group)
    return float(value)
