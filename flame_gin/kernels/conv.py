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


def _conv_one(*, x, weight, bias, state, activation):
    """One sequence. x [T, D] float32, weight [D, W], state [D, W] or None -> (y [T, D], final state [D, W])."""
    length, dim = x.shape
    width = weight.shape[-1]
    past = x.new_zeros(dim, width) if state is None else state.float()
    padded = torch.cat([past.t(), x], dim=0)  # [W + T, D]
    windows = padded.unfold(0, width, 1)[1:]  # [T, D, W]: inputs t-W+1 .. t
    y = (windows * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return _activate(y, activation), padded[-width:].t()


def causal_conv1d(
    x, weight=None, bias=None, residual=None, initial_state=None, output_final_state=False, activation=None,
    backend="triton", cu_seqlens=None, cu_seqlens_cpu=None, chunk_indices=None, cp_context=None, **kwargs,
):
    """Reference for `fla.modules.causal_conv1d.causal_conv1d`: x [B, T, D] (B == 1 with cu_seqlens)."""
    if cp_context is not None:
        raise NotImplementedError("the reference causal_conv1d has no context-parallel path")
    if weight is None:
        raise NotImplementedError("the reference causal_conv1d needs a weight")
    batch, length, dim = x.shape
    if cu_seqlens is None:
        bounds = [(b, 0, length) for b in range(batch)]
    else:
        if batch != 1:
            raise ValueError(f"cu_seqlens needs a batch of 1, got batch {batch}")
        edges = [int(e) for e in cu_seqlens.tolist()]
        bounds = [(0, s, e) for s, e in zip(edges, edges[1:])]
    if initial_state is not None and initial_state.shape[0] != len(bounds):
        raise ValueError(f"initial_state has {initial_state.shape[0]} states for {len(bounds)} sequences")
    outputs, states = [], []
    for n, (row, start, end) in enumerate(bounds):
        y, state = _conv_one(
            x=x[row, start:end].float(), weight=weight, bias=bias, activation=activation,
            state=None if initial_state is None else initial_state[n],
        )
        outputs.append(y)
        states.append(state)
    y = torch.stack(outputs) if cu_seqlens is None else torch.cat(outputs)[None]
    if residual is not None:
        y = y + residual.float()
    final_state = torch.stack(states).to(x.dtype) if output_final_state else None
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
