"""GPU loss kernels from FLA, as (sum of token losses in fp32) for one micro-batch.

Why two: FLA's fused linear cross-entropy never materialises the logits (lowest memory) but walks the
vocabulary projection in chunks with an fp32 weight-gradient accumulator, which costs time; the logits path
keeps one bf16 logits tensor and lets FLA's Triton cross-entropy write the gradient into it in place (no fp32
copy of the logits, unlike ``torch.nn.functional.cross_entropy`` on upcast logits). Which pays is measured
in ``benchmarks/RESULTS.md``. Both need CUDA; labels arrive shifted, ``-100`` ignored.
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("linear", "logits")


def token_loss_sum(*, hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, mode: str) -> torch.Tensor:
    """Sum of the token cross-entropies of ``head(hidden)`` against ``labels``, by FLA's ``mode`` kernel."""
    if mode not in MODES:
        raise ValueError(f"fused loss mode {mode!r} is not one of {MODES}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if mode == "linear":
        from fla.modules import FusedLinearCrossEntropyLoss

        return FusedLinearCrossEntropyLoss(reduction="sum")(
            hidden, labels, head.weight, getattr(head, "bias", None)
        ).float()
    return logits_loss_sum(logits=head(hidden), labels=labels)


def logits_loss_sum(*, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the token cross-entropies of (bf16) ``logits``: FLA's Triton cross-entropy, gradient in place."""
    from fla.modules import FusedCrossEntropyLoss

    return FusedCrossEntropyLoss(inplace_backward=True, reduction="sum")(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device)
    ).float()
