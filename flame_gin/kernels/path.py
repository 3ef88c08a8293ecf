"""Pure-PyTorch stand-in for PaTH attention's training op in FLA 0.6, `parallel_path_attn`.

Why: the op is Triton only, so without it PaTH cannot train on a CPU. The attention itself is FLA's own reference
(`fla.ops.path_attn.naive.naive_path_attn`: softmax attention whose keys are seen through the product of the
Householder transforms between key and query, plus optional forget gates); what is added is packed documents
run one by one (``cu_seqlens``). The transformed-key cache FLA's kernel returns for decoding is not produced: a
call asking for it (``use_cache=True``, prefill before generation) is refused with a clear error.
"""

from __future__ import annotations

import torch

from flame_gin.kernels import attention


def parallel_path_attn(q, k, v, w, beta, g=None, scale=None, cu_seqlens=None, use_cache=False, **kwargs):
    """Reference for `fla.ops.path_attn.parallel_path_attn`: q [B, T, HQ, D], k, v, w [B, T, H, D], beta [B, T, H],
    g [B, T, HQ] log forget gates or None; returns ``(o, None)``."""
    if use_cache:
        raise NotImplementedError("the PaTH reference has no transformed-key cache: decode PaTH on a GPU")
    from fla.ops.path_attn.naive import naive_path_attn

    if g is None:
        g = q.new_zeros(q.shape[:3], dtype=torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def op(*parts):
        return naive_path_attn(*parts, scale)

    o = attention.per_document(op=op, tensors=[q, k, v, w, beta, g], cu_seqlens=cu_seqlens)
    return o.to(q.dtype), None
