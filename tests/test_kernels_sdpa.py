"""The ops that let FLA's softmax attention layer and Mamba2 run without flash-attn or Triton, each against an
independent reference: attention against a float64 softmax written out here, rotary embedding and the gated
group norm against FLA's own PyTorch references."""

import pytest
import torch

from flame_gin.kernels import norm, rotary, sdpa


def _reference_attention(q, k, v, *, window_left=None):
    """float64 causal softmax attention over [time, heads, dim], key/value heads repeated for grouped queries."""
    q, k, v = (t.double() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    i, j = torch.arange(q.shape[0]).unsqueeze(1), torch.arange(k.shape[0]).unsqueeze(0)
    allowed = j <= i
    if window_left is not None:
        allowed &= j >= i - window_left
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("window", [None, 3])
def test_dense_attention_matches_float64(kv_heads, window):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 11, 4, 8, generator=g)
    k, v = torch.randn(2, 11, kv_heads, 8, generator=g), torch.randn(2, 11, kv_heads, 8, generator=g)
    out = sdpa.flash_attn_func(q, k, v, causal=True, window_size=(-1, -1) if window is None else (window, 0))
    for b in range(2):
        torch.testing.assert_close(
            out[b].double(), _reference_attention(q[b], k[b], v[b], window_left=window), rtol=1e-5, atol=1e-5
        )


def test_packed_attention_attends_within_each_document():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(17, 4, 8, generator=g) for _ in range(3))
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    out = sdpa.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        torch.testing.assert_close(
            out[start:end].double(),
            _reference_attention(q[start:end], k[start:end], v[start:end]),
            rtol=1e-5,
            atol=1e-5,
        )


def test_install_binds_only_where_flash_attn_is_missing(monkeypatch):
    import fla.layers.attn as attn

    monkeypatch.setattr(attn, "flash_attn_func", None)
    assert sdpa.install() and attn.flash_attn_func is sdpa.flash_attn_func
    assert attn.flash_attn_varlen_func is sdpa.flash_attn_varlen_func
    real = lambda *a, **k: None  # noqa: E731  (stands for flash-attn's own function)
    monkeypatch.setattr(attn, "flash_attn_func", real)
    assert not sdpa.install() and attn.flash_attn_func is real


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_matches_fla_reference_with_offsets_and_documents(interleaved):
    from fla.modules.rotary.ops import rotary_embedding_ref

    g = torch.Generator().manual_seed(2)
    cos, sin = torch.randn(40, 6, generator=g), torch.randn(40, 6, generator=g)
    x = torch.randn(2, 10, 3, 16, generator=g)
    torch.testing.assert_close(
        rotary.rotary_embedding(x, cos, sin, interleaved=interleaved, seqlen_offsets=3),
        rotary_embedding_ref(x, cos[3:13], sin[3:13], interleaved=interleaved),
    )
    offsets = torch.tensor([1, 4])
    got = rotary.rotary_embedding(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)
    for b, o in enumerate(offsets.tolist()):
        torch.testing.assert_close(
            got[b : b + 1],
            rotary_embedding_ref(x[b : b + 1], cos[o : o + 10], sin[o : o + 10], interleaved=interleaved),
        )
    packed = x[:1]
    cu = torch.tensor([0, 4, 10])
    got = rotary.rotary_embedding(packed, cos, sin, interleaved=interleaved, cu_seqlens=cu)
    want = torch.cat(
        [
            rotary_embedding_ref(packed[:, :4], cos[:4], sin[:4], interleaved=interleaved),
            rotary_embedding_ref(packed[:, 4:], cos[:6], sin[:6], interleaved=interleaved),
        ],
        dim=1,
    )
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("group_size", [None, 8])
def test_gated_group_rms_norm_matches_fla_reference(norm_before_gate, group_size):
    from fla.modules.norm.layernorm_gated import rms_norm_ref

    g = torch.Generator().manual_seed(3)
    x, z = torch.randn(3, 5, 32, generator=g), torch.randn(3, 5, 32, generator=g)
    w = torch.randn(32, generator=g)
    got = norm.gated_group_rms_norm(x, w, None, z=z, eps=1e-6, group_size=group_size, norm_before_gate=norm_before_gate)
    want = rms_norm_ref(
        x.double(), w.double(), None, z=z.double(), eps=1e-6, group_size=group_size, norm_before_gate=norm_before_gate
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
