"""The language-modelling loss as a (sum, count) pair, so it can be normalised by the global token count.

Summing per micro-batch and dividing once by the number of valid tokens over every micro-batch and every
data-parallel rank gives the same gradient as one big batch, whatever the padding or document layout; a
per-micro-batch mean would weight short micro-batches more. Labels arrive already shifted (``-100`` = ignore).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def _fused_linear_ce():
  from fla.modules import FusedLinearCrossEntropyLoss
  return FusedLinearCrossEntropyLoss(reduction="sum")


def backbone_kwargs(batch: dict) -> dict:
  """Keyword arguments for the model body: ``cu_seqlens`` only in varlen mode."""
  kwargs = {"input_ids": batch["input_ids"]}
  if batch.get("cu_seqlens") is not None:
    kwargs["cu_seqlens"] = batch["cu_seqlens"]
  return kwargs


def loss_sum(*, model: nn.Module, batch: dict, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
  """Returns (sum of token losses in fp32, number of valid tokens) for one micro-batch.

  ``fused`` uses FLA's fused linear cross-entropy (the full logits tensor is never materialised; GPU only);
  otherwise logits are computed and the loss is taken in fp32.
  """
  labels = batch["labels"]
  hidden = model.model(**backbone_kwargs(batch), use_cache=False).last_hidden_state
  head = model.get_output_embeddings()
  count = (labels != IGNORE_INDEX).sum()
  if fused:
    total = _fused_linear_ce()(hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), head.weight,
                               getattr(head, "bias", None))
    return total.float(), count
  logits = head(hidden).float()
  total = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="sum")
  return total, count
