"""The language-modelling loss as a (sum, count) pair, so it can be normalised by the global token count.

Summing per micro-batch and dividing once by the number of valid tokens over every micro-batch and every
data-parallel rank gives the same gradient as one big batch, whatever the padding or document layout; a
per-micro-batch mean would weight short micro-batches more. Labels arrive already shifted (``-100`` = ignore).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from flame_gin import families
from flame_gin.data.packing import IGNORE as IGNORE_INDEX  # the data's label for "no target"

# What ``fused=True`` means on GPU: the faster of FLA's two kernels (benchmarks/RESULTS.md: 11.4 ms vs 53.2 ms
# for the loss head of GLA-340M at 16 x 2048 on an H100, for 1.1 GiB more memory).
DEFAULT_FUSED = "logits"


FUSED_VALUES = ("auto", "on", "off", "linear", "logits", True, False)


def fused_mode(*, fused_loss, device_type: str) -> bool | str:
    """What the setting ``flame_gin.run.fused_loss`` asks of ``loss_sum``: "linear"/"logits" pick one of FLA's
    GPU loss kernels (``flame_gin.fused``); True/"on", and "auto" on a GPU, the default one; False/"off" none.
    Any other value is a ``ValueError`` (a typo must not turn the kernel off silently)."""
    if not any(fused_loss is v or (isinstance(v, str) and fused_loss == v) for v in FUSED_VALUES):
        raise ValueError(
            f"flame_gin.run.fused_loss={fused_loss!r}: expected one of {', '.join(map(repr, FUSED_VALUES))}"
        )
    if fused_loss in ("linear", "logits"):
        return fused_loss
    return fused_loss is True or fused_loss == "on" or (fused_loss == "auto" and device_type == "cuda")


def backbone_kwargs(batch: dict) -> dict:
    """Keyword arguments for the model body: ``cu_seqlens`` only in varlen mode.

    The number of documents changes from batch to batch, so ``cu_seqlens``'s length is marked dynamic: compiled
    blocks then keep one graph instead of recompiling for every new document count (a no-op in eager mode).
    """
    kwargs = {"input_ids": batch["input_ids"]}
    if batch.get("cu_seqlens") is not None:
        kwargs["cu_seqlens"] = batch["cu_seqlens"]
        torch._dynamo.maybe_mark_dynamic(kwargs["cu_seqlens"], 0)
    return kwargs


def loss_sum(*, model: nn.Module, batch: dict, fused: bool | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (sum of token losses in fp32, number of valid tokens) for one micro-batch.

    ``fused`` uses one of FLA's GPU kernels (``flame_gin.fused``: "linear", the logits are never materialised,
    or "logits", bf16 logits with an in-place Triton cross-entropy; True means ``DEFAULT_FUSED``); otherwise
    logits are computed and the loss is taken in fp32.
    """
    labels = batch["labels"]
    hidden = families.body(model)(**backbone_kwargs(batch), use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    count = (labels != IGNORE_INDEX).sum()
    if fused:
        from flame_gin import fused as fused_lib

        mode = DEFAULT_FUSED if fused is True else fused
        return fused_lib.token_loss_sum(hidden=hidden, head=head, labels=labels, mode=mode), count
    logits = head(hidden).float()
    total = F.cross_entropy(
        logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total, count


def shard_for_context(*, batch: dict, cp_mesh) -> dict:
    """This context rank's slice of ``batch`` (sequence split over ``cp_mesh``), carrying the ``cp`` info the
    linear-attention layers need to hand their recurrent state across ranks. Counting valid tokens on the slice
    keeps the global count exact."""
    from flame_gin.parallel.context import shard_batch

    local = shard_batch(
        input_ids=batch["input_ids"], labels=batch["labels"], cp_mesh=cp_mesh, cu_seqlens=batch.get("cu_seqlens")
    )
    return {**batch, **local}


def parallel_loss_sum(*, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``loss_sum`` for a parallelised model: the whole model is called (FSDP's root hooks gather the embedding,
    final norm and head), and vocabulary-sharded DTensor logits (tensor + loss parallel) are reduced with
    explicit collectives instead of being gathered. A ``cp`` entry (from ``shard_for_context``) turns the
    context-parallel state hand-over on for this forward."""
    from flame_gin.parallel.context import context_parallel
    from flame_gin.parallel.loss import token_loss_sum

    labels = batch["labels"]
    scope = context_parallel(batch["cp"]) if batch.get("cp") is not None else contextlib.nullcontext()
    with scope:
        logits = model(**backbone_kwargs(batch), use_cache=False).logits
    return token_loss_sum(logits=logits, labels=labels), (labels != IGNORE_INDEX).sum()
