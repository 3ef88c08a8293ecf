"""Pure-PyTorch stand-ins for the Forgetting Transformer's attention in FLA 0.6: the training op
`parallel_forgetting_attn` and the one-token decoding op `attn_decoding_one_step` its layer calls.

Why: both are Triton only, so without these FoX cannot train or generate on a CPU. The attention itself is FLA's own
quadratic reference (`fla.ops.forgetting_attn.naive.naive_forgetting_attn`: softmax of ``q k^T * scale`` plus the
summed log forget gates between key and query); what is added is packed documents run one by one
(``cu_seqlens``) and, for decoding, each sequence's single query read as the last row of its document.
"""

from __future__ import annotations

import torch

from flame_gin.kernels import attention


def parallel_forgetting_attn(q, k, v, g, scale=None, window_size=None, cu_seqlens=None, **kwargs):
    """Reference for `fla.ops.forgetting_attn.parallel_forgetting_attn`: q [B, T, HQ, D], k, v [B, T, H, D],
    g [B, T, HQ] log forget gates; returns o [B, T, HQ, D]."""
    from fla.ops.forgetting_attn.naive import naive_forgetting_attn

    def op(q_, k_, v_, g_):
        return naive_forgetting_attn(q_, k_, v_, g_, scale, window_size)

    return attention.per_document(op=op, tensors=[q, k, v, g], cu_seqlens=cu_seqlens).to(q.dtype)


def attn_decoding_one_step(
    q, k, v, g=None, scale=None, cu_seqlens=None, do_gate_scale=False, *, window_size=None, sink_bias=None
):
    """Reference for `fla.ops.attn.decoding.attn_decoding_one_step` as FoX calls it: q [1, N, HQ, D], one query at
    the end of each of the N key sequences of k, v [1, T, H, D] (``cu_seqlens``); g [1, T, HQ] or None."""
    if do_gate_scale or sink_bias is not None:
        raise NotImplementedError("the reference decoding step has no gate scaling or attention sink")
    from fla.ops.forgetting_attn.naive import naive_forgetting_attn

    bounds = cu_seqlens.tolist()
    outputs = []
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        queries = q.new_zeros(1, end - start, *q.shape[2:])
        queries[:, -1] = q[:, n]
        gates = k.new_zeros(1, end - start, q.shape[2]) if g is None else g[:, start:end]
        o = naive_forgetting_attn(queries, k[:, start:end], v[:, start:end], gates, scale, window_size)
        outputs.append(o[:, -1:])
    return torch.cat(outputs, dim=1).to(q.dtype)
