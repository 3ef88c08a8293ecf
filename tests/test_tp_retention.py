"""RetNet under tensor parallel: a marked layer's retention gives its heads the decays of their global indices;
an unmarked call reaches the op unchanged. Checked against the op run over all heads, on a CPU."""

import importlib

import torch
from torch import nn

from flame_gin import kernels
from flame_gin.parallel import tp_retention


class _Layer(nn.Module):
    def forward(self, q, k, v):
        return importlib.import_module("fla.layers.multiscale_retention").chunk_retention(q=q, k=k, v=v)


def test_a_marked_layer_uses_global_head_decays_and_an_unmarked_call_is_unchanged(monkeypatch):
    kernels.select(mode="reference")
    module = importlib.import_module("fla.layers.multiscale_retention")
    for name in tp_retention.NAMES:  # the wrappers go when the test ends, so kernel selection sees its own ops
        monkeypatch.setattr(module, name, getattr(module, name))
    op = module.chunk_retention
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 20, 4, 8) for _ in range(3))
    whole, _ = op(q=q, k=k, v=v)  # heads 0..3, before any wrapping
    layer = _Layer()
    tp_retention.mark(layer=layer, offset=2)
    assert module.chunk_retention is not op and module.chunk_retention.__wrapped__ is op
    upper, _ = layer(q[:, :, 2:], k[:, :, 2:], v[:, :, 2:])  # a rank holding heads 2 and 3
    torch.testing.assert_close(upper, whole[:, :, 2:], atol=1e-5, rtol=1e-5)
    unmarked, _ = module.chunk_retention(q=q[:, :, 2:], k=k[:, :, 2:], v=v[:, :, 2:])  # decays of heads 0, 1
    assert torch.equal(unmarked, op(q=q[:, :, 2:], k=k[:, :, 2:], v=v[:, :, 2:])[0])
    assert not torch.allclose(unmarked, upper)
