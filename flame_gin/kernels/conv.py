"""Pure-PyTorch depthwise causal convolution with the signatures of FLA 0.6's `causal_conv1d` ops.

`ShortConvolution` (used by GLA, DeltaNet and Gated DeltaNet for q/k/v) calls `causal_conv1d` for whole
sequences and `causal_conv1d_update` for one-token decoding; both launch Triton kernels. The cache
layout follows FLA: `[N, D, W]`, the last W inputs of each sequence, oldest first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _activate(y, activation):
    if activation in ("swish", "silu"):
        return F.silu(y)
    if activation is None:
        return y
    raise ValueError(f"unsupported conv activation {activation!r} (expected swish, silu or None)")


def _positions(*, length: int, cu_seqlens, device):
    """Each token's sequence (None for a padded batch: the row is the sequence) and its position in it, computed
    on the device from `cu_seqlens` (no host read: one compiled graph serves any document count)."""
    t = torch.arange(length, device=device)
    if cu_seqlens is None:
        return None, t
    seq = torch.searchsorted(cu_seqlens[1:], t, right=True)  # n with cu[n] <= t < cu[n + 1]
    return seq, t - cu_seqlens[seq]


def _final_state(*, x, cu_seqlens, initial_state, width: int):
    """The last `width` inputs of each sequence, oldest first, `[N, D, W]`; a sequence shorter than `width` keeps
    the tail of its initial state (zeros without one), as a continued convolution needs."""
    batch, length, dim = x.shape
    if cu_seqlens is None:
        rows = torch.arange(batch, device=x.device)
        ends = torch.full((batch,), length, device=x.device)
        lengths = ends
    else:
        rows = torch.zeros(cu_seqlens.shape[0] - 1, dtype=torch.long, device=x.device)
        ends, lengths = cu_seqlens[1:], cu_seqlens[1:] - cu_seqlens[:-1]
    columns = []
    for j in range(width):
        inside = (lengths + j >= width)[:, None]
        own = x[rows, (ends - width + j).clamp(min=0)]  # [N, D]
        if initial_state is None:
            past = torch.zeros_like(own)
        else:
            past = initial_state[torch.arange(rows.shape[0], device=x.device), :, (lengths + j).clamp(max=width - 1)]
        columns.append(torch.where(inside, own, past.to(own.dtype)))
    return torch.stack(columns, dim=-1)


def causal_conv1d(
    x,
    weight=None,
    bias=None,
    residual=None,
    initial_state=None,
    output_final_state=False,
    activation=None,
    backend="triton",
    cu_seqlens=None,
    cu_seqlens_cpu=None,
    chunk_indices=None,
    cp_context=None,
    **kwargs,
):
    """Reference for `fla.modules.causal_conv1d.causal_conv1d`: x [B, T, D] (B == 1 with cu_seqlens).

    A sum of W shifted copies of x, masked at sequence starts (where the initial state, or zero, stands in): no
    per-document loop and no host synchronisation, so under `torch.compile` inductor fuses it into a few
    element-wise kernels and one graph serves any packing."""
    if cp_context is not None:
        raise NotImplementedError("the reference causal_conv1d has no context-parallel path")
    if weight is None:
        raise NotImplementedError("the reference causal_conv1d needs a weight")
    batch, length, dim = x.shape
    if cu_seqlens is not None and batch != 1:
        raise ValueError(f"cu_seqlens needs a batch of 1, got batch {batch}")
    sequences = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial_state is not None and initial_state.shape[0] != sequences:
        raise ValueError(f"initial_state has {initial_state.shape[0]} states for {sequences} sequences")
    width = weight.shape[-1]
    seq, pos = _positions(length=length, cu_seqlens=cu_seqlens, device=x.device)
    y = torch.zeros((), device=x.device) if bias is None else bias.float()
    padded = F.pad(x, (0, 0, width - 1, 0))  # one copy; every lag is a view of it (what a compiled graph saves)
    for lag in range(width):
        shifted = padded[:, width - 1 - lag : width - 1 - lag + length]
        if lag > 0 and (seq is not None or initial_state is not None):  # zero padding ends a lone row already
            inside = (pos >= lag)[None, :, None]
            if initial_state is None:
                shifted = torch.where(inside, shifted, torch.zeros((), dtype=x.dtype, device=x.device))
            else:
                column = (width + pos - lag).clamp(max=width - 1)  # padded index W + pos - lag, read when pos < lag
                past = (
                    initial_state[:, :, column].transpose(1, 2) if seq is None else initial_state[seq, :, column][None]
                )
                shifted = torch.where(inside, shifted, past.to(x.dtype))
        y = y + shifted.float() * weight[:, width - 1 - lag].float()
    y = _activate(y, activation)
    if residual is not None:
        y = y + residual.float()
    final_state = None
    if output_final_state:
        final_state = _final_state(x=x, cu_seqlens=cu_seqlens, initial_state=initial_state, width=width).to(x.dtype)
    return y.to(x.dtype), final_state


def causal_conv1d_update(x, cache, residual=None, weight=None, bias=None, activation=None):
    """Reference for `fla.modules.causal_conv1d.ops.causal_conv1d_update`: one new token per sequence;
    the cache `[N, D, W]` is updated in place, as FLA's kernel does."""
    if weight is None:
        raise NotImplementedError("the reference causal_conv1d_update needs a weight")
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    if rows.shape[0] != cache.shape[0]:
        raise ValueError(f"{rows.shape[0]} tokens for a cache of {cache.shape[0]} sequences")
    window = torch.cat([cache[..., 1:].float(), rows.float()[..., None]], dim=-1)
    cache.copy_(window.to(cache.dtype))
    y = (window * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    y = _activate(y, activation).reshape(shape)
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype), cache
