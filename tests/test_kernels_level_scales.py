"""FLA's log-linear attention gets its level scales in the queries' dtype (bf16 under autocast, where the scales
come out float32 from a float32 parameter and FLA's forward kernel refuses the mixed dot); the gradient reaches
the float32 scales."""

import importlib

import pytest
import torch

from flame_gin import kernels
from flame_gin.kernels import level_scales


def test_kernel_selection_wraps_the_name_the_layer_calls():
    kernels.select(mode="auto")
    module = importlib.import_module("fla.layers.log_linear_mamba2")
    assert module.chunk_log_linear_attn.wrapped_for_level_scales
    assert (
        module.chunk_log_linear_attn.__wrapped__
        is importlib.import_module("fla.ops.log_linear_attn.chunk").chunk_log_linear_attn
    )
    assert level_scales.install() is False  # idempotent


def test_scales_arrive_in_the_query_dtype_and_their_gradient_comes_back(monkeypatch):
    seen = {}

    def kernel(*, q, k, v, g, level_scales, **kwargs):
        seen.update(q=q.dtype, scales=level_scales.dtype, kwargs=kwargs)
        return (q.float() * level_scales.float().sum(-1, keepdim=True)).sum(), None

    module = importlib.import_module("fla.layers.log_linear_mamba2")
    monkeypatch.setattr(module, "chunk_log_linear_attn", kernel)
    assert level_scales.install() is True
    q = torch.ones(1, 4, 2, 8, dtype=torch.bfloat16)
    scales = torch.full((1, 4, 2, 3), 0.5, requires_grad=True)
    out, _ = module.chunk_log_linear_attn(q=q, k=q, v=q, g=None, level_scales=scales, scale=1.0)
    assert seen["q"] == seen["scales"] == torch.bfloat16 and seen["kwargs"] == {"scale": 1.0}
    out.backward()
    assert scales.grad.dtype == torch.float32 and torch.equal(scales.grad, torch.full_like(scales, 8.0))


def test_a_missing_fla_name_is_named(monkeypatch):
    module = importlib.import_module("fla.layers.log_linear_mamba2")
    monkeypatch.delattr(module, "chunk_log_linear_attn")
    with pytest.raises(RuntimeError, match="fla.layers.log_linear_mamba2 has no attribute 'chunk_log_linear_attn'"):
        level_scales.install()
