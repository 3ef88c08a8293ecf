"""Pure-PyTorch stand-ins for FLA 0.6's RWKV-6 entry points (`chunk_rwkv6`, `fused_recurrent_rwkv6`) and the
token shift its layers mix their inputs with (`fla.modules.token_shift.token_shift`).

Why: all three are Triton only, so without these RWKV-6 cannot train on a CPU. The recurrence is FLA's own
token-by-token reference (`fla.ops.rwkv6.recurrent_naive.naive_recurrent_rwkv6`, which works head-first); what is
added is the layout change and packed documents run one by one with their own states (``cu_seqlens``) through
the shared per-document runner. The token shift (the previous token of the same document minus this one, zero
or the carried token before a document's first) is written here because FLA's own PyTorch version takes no cache.
"""

from __future__ import annotations

import torch

from flame_gin.kernels import attention


def chunk_rwkv6(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kwargs):
    """Reference for `fla.ops.rwkv6.chunk_rwkv6`: r, k, w [B, T, H, K] (w the log decay), v [B, T, H, V],
    u [H, K] the bonus of the current token; ``o_t = r_t (S_{t-1} + diag(u) k_t v_t^T)``."""
    from fla.ops.rwkv6.recurrent_naive import naive_recurrent_rwkv6

    def core(r_, k_, v_, w_, h0):
        o, ht = naive_recurrent_rwkv6(
            *(x.transpose(1, 2) for x in (r_, k_, v_, w_)),
            u.float(),
            scale=scale,
            initial_state=h0,
            output_final_state=True,
        )
        return o.transpose(1, 2), ht

    return attention.run_segments(
        core=core,
        tensors=[x.float() for x in (r, k, v, w)],
        initial_state=initial_state,
        output_final_state=output_final_state,
        state_v_first=False,
        cu_seqlens=cu_seqlens,
        out_dtype=v.dtype,
    )


def fused_recurrent_rwkv6(r, k, v, w, u, **kwargs):
    """Reference for `fla.ops.rwkv6.fused_recurrent_rwkv6` (decoding): the same recurrence."""
    return chunk_rwkv6(r, k, v, w, u, **kwargs)


def token_shift(x, cu_seqlens=None, cache=None, output_cache=False, **kwargs):
    """Reference for `fla.modules.token_shift.token_shift`: per document, the previous token minus this one; before
    a document's first token the carried ``cache`` [N, D] (or [N, 1, D]) or zero. With ``output_cache``, also each
    document's last token [N, 1, D]."""
    spans = attention.segments(cu_seqlens=cu_seqlens, batch=x.shape[0], length=x.shape[1])
    deltas, lasts = [], []
    for n, (row, start, end) in enumerate(spans):
        xs = x[row, start:end]
        first = torch.zeros_like(xs[:1]) if cache is None else cache[n].reshape(1, -1).to(xs.dtype)
        deltas.append(torch.cat([first, xs[:-1]]) - xs)
        lasts.append(xs[-1:] if end > start else first)
    out = torch.cat(deltas).unsqueeze(0) if cu_seqlens is not None else torch.stack(deltas)
    return (out, torch.stack(lasts)) if output_cache else out
