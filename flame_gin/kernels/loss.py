"""Pure-PyTorch stand-ins for FLA 0.6's fused cross-entropy losses.

`FusedCrossEntropyLoss` asserts a CUDA device and `FusedLinearCrossEntropyLoss` runs Triton kernels;
FLA's causal-LM heads build them when `labels` are passed. These subclasses keep FLA's constructors
(so every option is accepted and stored) and compute the same loss with `torch.nn.functional` in
float32. Vocabulary-parallel process groups are not supported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fla.modules import FusedCrossEntropyLoss as _FusedCrossEntropyLoss
from fla.modules import FusedLinearCrossEntropyLoss as _FusedLinearCrossEntropyLoss
from fla.modules.l2warp import l2_warp


def _transform_logits(*, logits, logit_scale, logit_softcapping):
    logits = logits.float() * logit_scale
    if logit_softcapping:
        logits = logit_softcapping * torch.tanh(logits / logit_softcapping)
    return logits


def _reduce(*, loss, target, ignore_index, reduction):
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / (target != ignore_index).sum()


def _no_process_group(process_group):
    if process_group is not None:
        raise NotImplementedError("the reference fused cross-entropy does not support a vocabulary-parallel group")


class ReferenceCrossEntropyLoss(_FusedCrossEntropyLoss):
    """FLA's `FusedCrossEntropyLoss` computed with `F.cross_entropy` (plus its optional z-loss)."""

    def forward(self, input, target):
        _no_process_group(self.process_group)
        logits = _transform_logits(
            logits=input,
            logit_scale=self.logit_scale,
            logit_softcapping=self.logit_softcapping,
        )
        loss = F.cross_entropy(
            logits,
            target,
            ignore_index=self.ignore_index,
            reduction="none",
            label_smoothing=self.label_smoothing,
        )
        valid = target != self.ignore_index
        z_loss = self.lse_square_scale * torch.logsumexp(logits, dim=-1).square() * valid
        loss = loss + z_loss
        loss = _reduce(loss=loss, target=target, ignore_index=self.ignore_index, reduction=self.reduction)
        if self.return_z_loss:
            z_loss = _reduce(loss=z_loss, target=target, ignore_index=self.ignore_index, reduction=self.reduction)
            return loss, z_loss
        return loss


class ReferenceLinearCrossEntropyLoss(_FusedLinearCrossEntropyLoss):
    """FLA's `FusedLinearCrossEntropyLoss` computed as a plain linear layer and `F.cross_entropy`."""

    def forward(self, x, target, weight, bias=None):
        _no_process_group(self.process_group)
        logits = F.linear(x.reshape(-1, x.shape[-1]).float(), weight.float(), None if bias is None else bias.float())
        logits = _transform_logits(
            logits=logits,
            logit_scale=self.logit_scale,
            logit_softcapping=self.logit_softcapping,
        )
        target = target.reshape(-1)
        loss = F.cross_entropy(
            logits,
            target,
            ignore_index=self.ignore_index,
            reduction="none",
            label_smoothing=self.label_smoothing,
        )
        loss = _reduce(loss=loss, target=target, ignore_index=self.ignore_index, reduction=self.reduction)
        if self.use_l2warp:
            loss = l2_warp(loss, logits[None], self.l2_penalty_factor)
        return loss
