"""Pure-PyTorch rotary position embedding with the signature of FLA 0.6's `rotary_embedding`.

FLA's `RotaryEmbedding` (inside its softmax `Attention` layer: FLA's `transformer`, Samba and hybrids) calls
`fla.modules.rotary.ops.rotary_embedding`, a Triton kernel. This version rotates in float32 and returns the
input dtype; positions restart at every document of a packed row (`cu_seqlens`) and are shifted by
`seqlen_offsets` (one offset, or one per sequence), as FLA's kernel does.
"""

from __future__ import annotations

import torch


def _positions(*, x: torch.Tensor, seqlen_offsets, cu_seqlens) -> torch.Tensor:
    """Position of every token, `[B, T]`."""
    batch, time = x.shape[:2]
    t = torch.arange(time, device=x.device)
    if cu_seqlens is not None:
        doc = torch.searchsorted(cu_seqlens[1:], t, right=True)
        pos = (t - cu_seqlens[doc]).unsqueeze(0)
        if isinstance(seqlen_offsets, torch.Tensor):
            return pos + seqlen_offsets.to(x.device)[doc].unsqueeze(0)
        return pos + seqlen_offsets
    pos = t.unsqueeze(0).expand(batch, time)
    if isinstance(seqlen_offsets, torch.Tensor):
        return pos + seqlen_offsets.to(x.device).view(-1, 1)
    return pos + seqlen_offsets


def rotary_embedding(
    x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None, chunk_indices=None
):
    """`x`: `[B, T, H, D]`; `cos`, `sin`: `[positions, R // 2]` tables; the first R channels are rotated."""
    pos = _positions(x=x, seqlen_offsets=seqlen_offsets, cu_seqlens=cu_seqlens)
    cos, sin = cos.float()[pos].unsqueeze(2), sin.float()[pos].unsqueeze(2)  # [B, T, 1, R/2]
    rot = 2 * cos.shape[-1]
    xf = x.float()
    head, tail = xf[..., :rot], xf[..., rot:]
    if interleaved:
        x1, x2 = head[..., 0::2], head[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = head.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return torch.cat((out, tail), dim=-1).to(x.dtype)
