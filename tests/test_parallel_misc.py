"""float8 refusal without torchao, memory estimate on meta, refusal of families without a TP plan."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import dist_models
from flame_gin.mesh import ParallelDims
from flame_gin.parallel.memory import estimate_memory
from flame_gin.parallel.tp_plans import apply_tensor_parallel


@pytest.mark.skipif(importlib.util.find_spec("torchao") is not None, reason="torchao installed")
def test_float8_says_torchao_is_missing():
    from flame_gin.parallel.float8 import apply_float8
    with pytest.raises(RuntimeError, match="torchao is not installed"):
        apply_float8(torch.nn.Sequential(torch.nn.Linear(16, 16)))


def test_memory_estimate_scales_with_sharding():
    model = dist_models.build("llama").to("meta")
    one = estimate_memory(model=model, dims=ParallelDims(world_size=1), local_batch=2, seq_len=32)
    eight = estimate_memory(model=model, dims=ParallelDims(world_size=8), local_batch=2, seq_len=32)
    n = sum(p.numel() for p in model.parameters())
    assert one["params"] == pytest.approx(n * 4 / 1024 ** 3)
    assert eight["optimizer"] == pytest.approx(one["optimizer"] / 8)
    assert one["activations"] is not None and one["activations"] > 0


def test_tensor_parallel_refuses_unknown_family():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="no plan for model family 'gpt2'.*gla"):
        apply_tensor_parallel(model, tp_mesh=None)
