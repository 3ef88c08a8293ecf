"""The language-modelling loss, its one home: a (sum, count) pair normalised by the global token count.

Summing per micro-batch and dividing once by the number of valid tokens over every micro-batch and every
data-parallel rank gives the same gradient as one big batch, whatever the padding or document layout; a
per-micro-batch mean would weight short micro-batches more. Labels arrive already shifted (``-100`` = ignore).

Three ways to take the sum, chosen by ``fused_mode`` from ``flame_gin.run.fused_loss`` the same way on one
process, on a mesh and in pipeline stages:
- fp32 ``F.cross_entropy`` on upcast logits (CPU, or ``fused_loss='off'``);
- FLA's GPU kernels: "logits" keeps one bf16 logits tensor and lets FLA's Triton cross-entropy write the
  gradient into it in place (no fp32 copy); "linear" never materialises the logits but walks the vocabulary
  projection in chunks with an fp32 weight-gradient accumulator, which costs time (measured in
  ``benchmarks/RESULTS.md``). "linear" needs the hidden states and the head apart, which only the
  single-process path has; a mesh takes the logits from the whole model and uses "logits";
- vocabulary-sharded DTensor logits (tensor + loss parallel), reduced with explicit collectives (max, sum of
  exponentials, target logit), so ``backward()`` needs no special context and the full logits are never
  gathered.
On a mesh each rank returns ``sum of its token losses / valid tokens over all data and context ranks`` and
gradients are summed (not averaged) over those ranks (``fsdp.apply_data_parallel`` sets FSDP's divide factor
to 1), so the update equals that of the global token mean whatever the split across ranks and micro-batches.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flame_gin import families
from flame_gin import mesh as mesh_lib
from flame_gin.data.packing import IGNORE as IGNORE_INDEX  # the data's label for "no target"

# What ``fused=True`` means on GPU: the faster of FLA's two kernels (benchmarks/RESULTS.md: 11.4 ms vs 53.2 ms
# for the loss head of GLA-340M at 16 x 2048 on an H100, for 1.1 GiB more memory).
DEFAULT_FUSED = "logits"
MODES = ("linear", "logits")  # FLA's two GPU kernels


FUSED_VALUES = ("auto", "on", "off", "linear", "logits", True, False)


def fused_mode(*, fused_loss, device_type: str) -> str | bool:
    """What the setting ``flame_gin.run.fused_loss`` asks of ``loss_sum``: "linear"/"logits" pick one of FLA's
    GPU loss kernels; True/"on", and "auto" on a GPU, the default one (``DEFAULT_FUSED``); False/"off" none
    (returned as False).
    Any other value is a ``ValueError`` (a typo must not turn the kernel off silently)."""
    if not any(fused_loss is v or (isinstance(v, str) and fused_loss == v) for v in FUSED_VALUES):
        raise ValueError(
            f"flame_gin.run.fused_loss={fused_loss!r}: expected one of {', '.join(map(repr, FUSED_VALUES))}"
        )
    if fused_loss in ("linear", "logits"):
        return fused_loss
    on = fused_loss is True or fused_loss == "on" or (fused_loss == "auto" and device_type == "cuda")
    return DEFAULT_FUSED if on else False


def fla_token_loss_sum(*, hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, mode: str) -> torch.Tensor:
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
    return _fla_logits_sum(logits=head(hidden), labels=labels)


def _fla_logits_sum(*, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the token cross-entropies of (bf16) ``logits``: FLA's Triton cross-entropy, gradient in place."""
    from fla.modules import FusedCrossEntropyLoss

    return FusedCrossEntropyLoss(inplace_backward=True, reduction="sum")(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device)
    ).float()


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


def _vocab_parallel_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
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


def token_loss_sum(*, logits: torch.Tensor, labels: torch.Tensor, fused: str | bool) -> torch.Tensor:
    """Sum of token cross-entropies (fp32), ignoring -100, from logits: vocabulary-sharded DTensor logits by
    collectives; whole logits by FLA's Triton cross-entropy when ``fused`` (any kernel: only logits are at
    hand), else by fp32 ``F.cross_entropy``."""
    if mesh_lib.is_dtensor(logits):
        return _vocab_parallel_loss_sum(logits, labels)
    if fused:
        return _fla_logits_sum(logits=logits, labels=labels)
    return F.cross_entropy(
        logits.flatten(0, -2).float(), labels.flatten().to(logits.device), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def normalized_loss(
    *, logits: torch.Tensor, labels: torch.Tensor, global_tokens: torch.Tensor, fused: str | bool
) -> torch.Tensor:
    """This rank's share of the global token-mean loss: call `.backward()` on it; summing it over the data
    and context ranks (and micro-batches) gives the global mean."""
    return token_loss_sum(logits=logits, labels=labels, fused=fused) / global_tokens.clamp_min(1).to(torch.float32)


def reduce_for_logging(*, loss_share: torch.Tensor, group=None) -> float:
    """Global mean loss from each rank's share (an all-reduce; for logging only)."""
    value = loss_share.detach().to(torch.float64).clone()
    if group is not None and dist.is_initialized():
        dist.all_reduce(value, group=group)
    return float(value)


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

    ``fused`` (from ``fused_mode``) names one of FLA's GPU kernels ("linear" or "logits"); False takes the
    loss in fp32 on the logits.
    """
    labels = batch["labels"]
    outputs = families.body(model)(**backbone_kwargs(batch), use_cache=False)
    hidden, head = outputs.last_hidden_state, model.get_output_embeddings()
    count = (labels != IGNORE_INDEX).sum()
    if fused:
        mode = DEFAULT_FUSED if fused is True else fused
        total = fla_token_loss_sum(hidden=hidden, head=head, labels=labels, mode=mode)
    else:
        total = token_loss_sum(logits=head(hidden), labels=labels, fused=False)
    return _with_router_loss(total, model=model, outputs=outputs, count=count), count


def _with_router_loss(total: torch.Tensor, *, model: nn.Module, outputs, count: torch.Tensor) -> torch.Tensor:
    """``total`` plus a routing family's balance term weighted by this micro-batch's valid tokens, so that
    after division by the global token count it is FLA's ``loss + aux_loss_scale * balance`` (averaged over
    micro-batches and ranks by their tokens)."""
    extra = families.router_loss(model=model, outputs=outputs)
    return total if extra is None else total + extra.float() * count


def shard_for_context(*, batch: dict, cp_mesh) -> dict:
    """This context rank's slice of ``batch`` (sequence split over ``cp_mesh``), carrying the ``cp`` info the
    linear-attention layers need to hand their recurrent state across ranks. Counting valid tokens on the slice
    keeps the global count exact."""
    from flame_gin.parallel.context import shard_batch

    local = shard_batch(
        input_ids=batch["input_ids"], labels=batch["labels"], cp_mesh=cp_mesh, cu_seqlens=batch.get("cu_seqlens")
    )
    return {**batch, **local}


def parallel_loss_sum(*, model: nn.Module, batch: dict, fused: str | bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``loss_sum`` for a parallelised model: the whole model is called (FSDP's root hooks gather the embedding,
    final norm and head), and vocabulary-sharded DTensor logits (tensor + loss parallel) are reduced with
    explicit collectives instead of being gathered. A ``cp`` entry (from ``shard_for_context``) turns the
    context-parallel state hand-over on for this forward."""
    from flame_gin.parallel.context import context_parallel

    labels = batch["labels"]
    scope = context_parallel(batch["cp"]) if batch.get("cp") is not None else contextlib.nullcontext()
    with scope:
        outputs = model(**backbone_kwargs(batch), use_cache=False)
    count = (labels != IGNORE_INDEX).sum()
    total = token_loss_sum(logits=outputs.logits, labels=labels, fused=fused)
    return _with_router_loss(total, model=model, outputs=outputs, count=count), count
