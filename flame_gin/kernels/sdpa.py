"""FLA's softmax `Attention` layer through PyTorch's SDPA wherever the `flash-attn` package is absent.

FLA 0.6's `fla.layers.attn.Attention` (FLA's `transformer`, Samba, and every hybrid that puts softmax
attention at chosen layer indices through the `attn` config) calls `flash_attn_func` /
`flash_attn_varlen_func` and refuses to build when `flash-attn` cannot be imported. That package has no wheel
for most torch/CUDA pairs and no CPU build, so without it these models could not train at all. The two
functions below keep flash-attn's calling convention (``[batch, time, heads, dim]`` tensors, causal,
``window_size=(left, right)``, grouped key/value heads, packed documents through ``cu_seqlens``) and compute
with `torch.nn.functional.scaled_dot_product_attention`, which picks its own fused kernel on GPU and runs on
CPU. Packed documents are attended one document at a time, so no document sees another and memory stays
the sum of each document's square, not the square of the packed row.

`install()` binds them into `fla.layers.attn` only where FLA left the names unset (flash-attn missing): a
machine that has flash-attn keeps it.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

_MODULE = "fla.layers.attn"


def _mask(*, q_len: int, k_len: int, causal: bool, window_size, device) -> torch.Tensor | None:
    """Boolean mask (True = attend) for queries aligned to the end of the keys, as flash-attn aligns them."""
    left, right = window_size if window_size is not None else (-1, -1)
    if not causal and left < 0 and right < 0:
        return None
    q_pos = torch.arange(q_len, device=device).unsqueeze(1) + (k_len - q_len)
    k_pos = torch.arange(k_len, device=device).unsqueeze(0)
    keep = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        keep &= k_pos <= q_pos
    if left >= 0:
        keep &= k_pos >= q_pos - left
    if right >= 0 and not causal:
        keep &= k_pos <= q_pos + right
    return keep


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, window_size, softmax_scale
) -> torch.Tensor:
    """SDPA over ``[batch, time, heads, dim]`` tensors; key/value heads may be fewer (grouped queries)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q_len, k_len = q.shape[-2], k.shape[-2]
    windowed = window_size is not None and tuple(window_size) != (-1, -1)
    kwargs = {"scale": softmax_scale, "enable_gqa": k.shape[1] != q.shape[1]}
    if causal and not windowed and q_len == k_len:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
    else:
        mask = _mask(q_len=q_len, k_len=k_len, causal=causal, window_size=window_size, device=q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)
    return out.transpose(1, 2)


def flash_attn_func(
    q, k, v, dropout_p: float = 0.0, softmax_scale=None, causal: bool = False, window_size=(-1, -1), **unused
):
    """flash-attn's dense entry point: ``[batch, time, heads, dim]`` in and out."""
    if dropout_p:
        raise ValueError(f"SDPA attention: dropout_p={dropout_p} is not supported (FLA's layer passes none)")
    return _attend(q, k, v, causal=causal, window_size=window_size, softmax_scale=softmax_scale)


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q=None,
    max_seqlen_k=None,
    dropout_p: float = 0.0,
    softmax_scale=None,
    causal: bool = False,
    window_size=(-1, -1),
    **unused,
):
    """flash-attn's packed entry point: ``[tokens, heads, dim]`` with document offsets ``cu_seqlens_*``.

    Each document is attended on its own (one host read of the offsets per call)."""
    if dropout_p:
        raise ValueError(f"SDPA attention: dropout_p={dropout_p} is not supported (FLA's layer passes none)")
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if len(starts_q) != len(starts_k):
        raise ValueError(f"SDPA attention: {len(starts_q) - 1} query documents but {len(starts_k) - 1} key documents")
    outs = []
    for i in range(len(starts_q) - 1):
        qs, ks = slice(starts_q[i], starts_q[i + 1]), slice(starts_k[i], starts_k[i + 1])
        outs.append(
            _attend(
                q[None, qs],
                k[None, ks],
                v[None, ks],
                causal=causal,
                window_size=window_size,
                softmax_scale=softmax_scale,
            )[0]
        )
    return torch.cat(outs, dim=0)


def install() -> bool:
    """Binds the SDPA versions into FLA's attention layer where flash-attn is missing; True when bound.

    Idempotent. Raises naming the module and attribute if FLA no longer has them, so an FLA upgrade that moves
    the calls fails loudly instead of failing at model build."""
    module = importlib.import_module(_MODULE)
    if not hasattr(module, "flash_attn_func"):
        raise RuntimeError(f"SDPA attention: FLA module {_MODULE} has no attribute 'flash_attn_func'")
    if module.flash_attn_func is not None and module.flash_attn_func is not flash_attn_func:
        return False  # flash-attn is installed: FLA keeps it
    module.flash_attn_func, module.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return True
