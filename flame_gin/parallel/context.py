"""Context parallel for linear-attention layers: each rank holds a contiguous slice of the sequence.

A linear-attention layer is a recurrence over a state `S`; a slice maps its entering state affinely:
`S_out = A(S_in) + F`, where `F` is the slice's final state from a zero start and `A` is the slice's
transition (a per-key decay for GLA; a K x K matrix for the delta rule, obtained by running the layer's own op
from the identity state with zero values). Each rank computes `(F, A)`, the pairs are all-gathered and
combined in rank order (in fp32) into the state entering every slice, and each rank reruns its slice from
that state. The combination lives in an autograd Function whose backward all-gathers the state gradients on
every rank and sends each rank the gradients of its own `(F, A)`, so the whole thing is exact and needs no
collective from autograd's own bookkeeping.

Documents (varlen `cu_seqlens`) reset the state: a slice that starts a document receives nothing, and a slice
that contains a document start passes nothing through. Short convolutions receive the previous rank's last
`kernel_size - 1` inputs as a halo (also through an autograd Function that returns the halo's gradient).

Usage (the model is built with `enable_context_parallel` applied once):

    local = shard_batch(input_ids=..., labels=..., cu_seqlens=..., cp_mesh=mesh["cp"])
    with context_parallel(local["cp"]):
        logits = model(input_ids=local["input_ids"], cu_seqlens=local["cu_seqlens"]).logits
    loss(logits, local["labels"]).backward()          # backward may run outside the context

torch's `context_parallel` is for softmax attention (SDPA) only and is never used for these layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib

import torch
import torch.distributed as dist
import torch.nn as nn

# family -> (layer module, {op name: kind}); kind: "gla" (diagonal decay, gate keyword), "delta" (matrix),
# "hgrn" (one state per channel, [B, D], its log forget gate under the keyword)
_OPS = {
    "gla": ("fla.layers.gla", {"fused_recurrent_gla": "gla:gk", "chunk_gla": "gla:g", "fused_chunk_gla": "gla:g"}),
    "delta_net": ("fla.layers.delta_net", {"fused_recurrent_delta_rule": "delta", "chunk_delta_rule": "delta"}),
    "gated_deltanet": (
        "fla.layers.gated_deltanet",
        {"chunk_gated_delta_rule": "delta", "fused_recurrent_gated_delta_rule": "delta"},
    ),
    # KDA's per-channel decay and Comba's state read through p keep the state map linear (a K x K matrix)
    "kda": ("fla.layers.kda", {"chunk_kda": "delta", "fused_recurrent_kda": "delta"}),
    "comba": ("fla.layers.comba", {"chunk_comba": "delta", "fused_recurrent_comba": "delta"}),
    "hgrn": ("fla.layers.hgrn", {"chunk_hgrn": "hgrn:g", "fused_recurrent_hgrn": "hgrn:g"}),
    "hgrn2": (
        "fla.layers.hgrn2",
        {"fused_recurrent_gla": "gla:gk", "chunk_gla": "gla:g", "fused_chunk_gla": "gla:g"},
    ),
}


def supported_families() -> tuple[str, ...]:
    return tuple(sorted(_OPS))


def check_context_parallel_config(*, config) -> None:
    """Raises if the model family has no context-parallel path."""
    family = getattr(config, "model_type", type(config).__name__)
    if family not in _OPS:
        raise ValueError(
            f"context parallel: no linear-attention path for model family {family!r}; supported: "
            f"{', '.join(supported_families())}"
        )
    if getattr(config, "attn", None):
        raise ValueError(
            f"context parallel: hybrid {family} models with softmax-attention layers "
            f"(config.attn={config.attn}) are not supported"
        )


@dataclasses.dataclass(frozen=True)
class CPInfo:
    """What the patched layers need to know about this rank's slice."""

    group: object
    rank: int
    size: int
    carry_in: bool  # the slice's first token continues a document from the previous rank


_ACTIVE: list[CPInfo] = []


@contextlib.contextmanager
def context_parallel(info: CPInfo):
    """While active, patched linear-attention ops and short convolutions hand state across `info.group`."""
    _ACTIVE.append(info)
    try:
        yield info
    finally:
        _ACTIVE.pop()


def shard_batch(
    *, input_ids: torch.Tensor, labels: torch.Tensor, cp_mesh, cu_seqlens: torch.Tensor | None = None
) -> dict:
    """This rank's contiguous slice of `input_ids`/`labels` ([B, T]) and its local `cu_seqlens`, plus `cp`
    (a `CPInfo`). Labels are already shifted, so slicing them needs no neighbour token."""
    size, rank = cp_mesh.size(), cp_mesh.get_local_rank()
    T = input_ids.shape[1]
    if T % size:
        raise ValueError(f"context parallel: sequence length {T} not divisible by cp={size}")
    width = T // size
    start, end = rank * width, (rank + 1) * width
    local_cu, carry_in = None, rank > 0
    if cu_seqlens is not None:
        if input_ids.shape[0] != 1:
            raise ValueError(f"context parallel: varlen batches must have one row, got {input_ids.shape[0]}")
        cu = [int(c) for c in cu_seqlens.tolist()]
        if cu[0] != 0 or cu[-1] != T:
            raise ValueError(f"context parallel: cu_seqlens must start at 0 and end at {T}, got {cu}")
        inner = [c - start for c in cu if start < c < end]
        local_cu = torch.tensor([0, *inner, width], dtype=cu_seqlens.dtype, device=cu_seqlens.device)
        carry_in = rank > 0 and start not in cu
    info = CPInfo(group=cp_mesh.get_group(), rank=rank, size=size, carry_in=carry_in)
    return {"input_ids": input_ids[:, start:end], "labels": labels[:, start:end], "cu_seqlens": local_cu, "cp": info}


# ----- the state scan ------------------------------------------------------------------------------------------


def _apply_transition(state, trans, kind, v_first):
    if kind == "gla":  # trans: [B, H, K] per-key decay
        return state * (trans[..., None, :] if v_first else trans[..., :, None])
    if kind == "hgrn":  # state and trans: [B, D]
        return state * trans
    return state @ trans if v_first else trans @ state  # trans: [B, H, K, K]


class _StateScan(torch.autograd.Function):
    """State entering this rank's slice from all (final state, transition) pairs of earlier ranks."""

    @staticmethod
    def forward(ctx, final, trans, info, kind, v_first):
        final32, trans32 = final.float().contiguous(), trans.float().contiguous()
        finals = [torch.empty_like(final32) for _ in range(info.size)]
        transs = [torch.empty_like(trans32) for _ in range(info.size)]
        dist.all_gather(finals, final32, group=info.group)
        dist.all_gather(transs, trans32, group=info.group)
        ctx.save_for_backward(*finals, *transs)
        ctx.info, ctx.kind, ctx.v_first, ctx.dtypes = info, kind, v_first, (final.dtype, trans.dtype)
        state = torch.zeros_like(final32)
        for r in range(info.rank):
            state = _apply_transition(state, transs[r], kind, v_first) + finals[r]
        return state

    @staticmethod
    def backward(ctx, grad):
        info = ctx.info
        saved = ctx.saved_tensors
        grad = (torch.zeros_like(saved[0]) if grad is None else grad.float()).contiguous()
        grads = [torch.empty_like(grad) for _ in range(info.size)]
        dist.all_gather(grads, grad, group=info.group)
        with torch.enable_grad():
            finals = [t.detach().requires_grad_() for t in saved[: info.size]]
            transs = [t.detach().requires_grad_() for t in saved[info.size :]]
            state, total = torch.zeros_like(finals[0]), 0.0
            for r in range(1, info.size):
                state = _apply_transition(state, transs[r - 1], ctx.kind, ctx.v_first) + finals[r - 1]
                total = total + (state * grads[r]).sum()
            if info.size == 1 or info.rank == info.size - 1:
                d_final, d_trans = torch.zeros_like(finals[0]), torch.zeros_like(transs[0])
            else:
                d_final, d_trans = torch.autograd.grad(
                    total, [finals[info.rank], transs[info.rank]], allow_unused=True, materialize_grads=True
                )
        return d_final.to(ctx.dtypes[0]), d_trans.to(ctx.dtypes[1]), None, None, None


def _cp_op(original, kind: str):
    """Wraps a linear-attention op (called with keyword arguments) with the cross-rank state hand-off."""
    family, _, gate_key = kind.partition(":")

    @functools.wraps(original)
    def op(**kw):
        info = _ACTIVE[-1] if _ACTIVE else None
        if info is None or info.size == 1:
            return original(**kw)
        if kw.get("initial_state") is not None:
            raise ValueError("context parallel: layers must not pass their own initial_state (no caches)")
        v_first = bool(kw.get("state_v_first", False))
        cu = kw.get("cu_seqlens")
        q = kw["q"] if "q" in kw else kw["x"]  # HGRN's ops take x (its input) and g
        base = {k: v for k, v in kw.items() if k not in ("initial_state", "output_final_state")}
        _, final = original(**base, initial_state=None, output_final_state=True)
        last = final[-1:] if cu is not None else final  # chain: the last document, or every row
        passes = info.carry_in and (cu is None or len(cu) == 2)
        if family in ("gla", "hgrn"):
            gate = kw[gate_key]
            trans = torch.exp(gate.float().sum(dim=1))  # [B, H, K] or [B, D]; varlen: B == 1 and one document
            if not passes:
                trans = torch.zeros_like(trans)
        else:
            B, H, K = last.shape[0], last.shape[1], kw["k"].shape[-1]
            if passes:
                eye = torch.eye(K, dtype=torch.float32, device=q.device).expand(B, H, K, K).contiguous()
                zero_v = torch.zeros(*kw["v"].shape[:-1], K, dtype=kw["v"].dtype, device=q.device)
                _, trans = original(**{**base, "v": zero_v}, initial_state=eye, output_final_state=True)
            else:
                trans = torch.zeros(B, H, K, K, dtype=torch.float32, device=q.device)
        entering = _StateScan.apply(last, trans, info, family, v_first)
        if not info.carry_in:
            entering = entering * 0.0  # keep it in the graph: every rank runs the scan's backward
        if cu is not None:
            init = torch.cat([entering, torch.zeros_like(final[1:], dtype=entering.dtype)], dim=0)
        else:
            init = entering
        return original(
            **base, initial_state=init.to(final.dtype), output_final_state=kw.get("output_final_state", False)
        )

    op._cp_original = original
    return op


# ----- short-convolution halo ------------------------------------------------------------------------------------


class _Halo(torch.autograd.Function):
    """The previous rank's last rows of `tail` (zeros on rank 0); backward returns the next rank's gradient."""

    @staticmethod
    def forward(ctx, tail, info):
        tail = tail.contiguous()
        tails = [torch.empty_like(tail) for _ in range(info.size)]
        dist.all_gather(tails, tail, group=info.group)
        ctx.info = info
        return tails[info.rank - 1].clone() if info.rank > 0 else torch.zeros_like(tail)

    @staticmethod
    def backward(ctx, grad):
        info = ctx.info
        grad = grad.contiguous()
        grads = [torch.empty_like(grad) for _ in range(info.size)]
        dist.all_gather(grads, grad, group=info.group)
        return (grads[info.rank + 1].clone() if info.rank + 1 < info.size else torch.zeros_like(grad)), None


def _conv_forward(module: nn.Module, original):
    @functools.wraps(original)
    def forward(x, *args, **kwargs):
        info = _ACTIVE[-1] if _ACTIVE else None
        if info is None or info.size == 1:
            return original(x, *args, **kwargs)
        if (
            args
            or kwargs.get("cache") is not None
            or kwargs.get("residual") is not None
            or kwargs.get("mask") is not None
        ):
            raise ValueError("context parallel: short convolution must be called as (x, cu_seqlens=...) only")
        halo_len = module.kernel_size[0] - 1
        if x.shape[1] < halo_len:
            raise ValueError(
                f"context parallel: slice length {x.shape[1]} shorter than the convolution halo {halo_len}"
            )
        halo = _Halo.apply(x[:, x.shape[1] - halo_len :], info)
        if not info.carry_in:
            halo = halo * 0.0
        cu = kwargs.get("cu_seqlens")
        if cu is not None:
            cu = torch.cat([cu[:1], cu[1:] + halo_len])
        y, state = original(
            torch.cat([halo, x], dim=1), cu_seqlens=cu, output_final_state=kwargs.get("output_final_state", False)
        )
        return y[:, halo_len:], state

    return forward


# ----- installation ------------------------------------------------------------------------------------------


def _patch_ops(family: str) -> None:
    module_name, ops = _OPS[family]
    module = importlib.import_module(module_name)
    for name, kind in ops.items():
        current = getattr(module, name)
        if not hasattr(current, "_cp_original"):
            setattr(module, name, _cp_op(current, kind))


def enable_context_parallel(model: nn.Module) -> nn.Module:
    """Patches the layers' ops (wrapping whichever kernels are installed: call `flame_gin.kernels.select`
    first) and the model's short convolutions. Outside `context_parallel(...)` they behave as before."""
    check_context_parallel_config(config=model.config)
    _patch_ops(model.config.model_type)
    for sub in model.modules():
        if type(sub).__name__ == "ShortConvolution" and not hasattr(sub.forward, "_cp_original"):
            wrapped = _conv_forward(sub, sub.forward)
            wrapped._cp_original = True
            sub.forward = wrapped
        if hasattr(sub, "_use_fused_qkv_conv"):  # Gated DeltaNet's fused q/k/v convolution has no halo path
            sub._use_fused_qkv_conv = lambda **kwargs: False
    return model
