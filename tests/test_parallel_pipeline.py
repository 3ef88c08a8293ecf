"""Pipeline stage ranges (the distributed schedules are in test_parallel_dist.py)."""

from __future__ import annotations

import pytest

from flame_gin.parallel.pipeline import stage_layer_ranges


def test_stage_ranges():
    assert stage_layer_ranges(num_layers=5, num_stages=2) == [(0, 3), (3, 5)]
    assert stage_layer_ranges(num_layers=8, num_stages=3, split_points=[2, 5]) == [(0, 2), (2, 5), (5, 8)]
    with pytest.raises(ValueError, match="split_points"):
        stage_layer_ranges(num_layers=8, num_stages=3, split_points=[5, 2])
    with pytest.raises(ValueError, match="3 stages for 2 blocks"):
        stage_layer_ranges(num_layers=2, num_stages=3)


def test_a_stage_before_the_last_makes_its_zero_loss_share_where_the_tokens_are(monkeypatch):
    """Every pipeline rank all-reduces its loss share; a stage before the last has none and contributes zero.
    That zero must sit on the device of the step's tensors: NCCL refuses a host tensor (the CPU's gloo takes
    both, so only a GPU pipeline would fail). The meta device stands in for the GPU."""
    from types import SimpleNamespace

    import torch

    from flame_gin.parallel import pipeline

    reduced = []
    monkeypatch.setattr(pipeline.dist, "all_reduce", lambda tensor, group=None: reduced.append(tensor.device.type))
    runtime = SimpleNamespace(
        _tokens=[None], has_last=False, has_first=False, group=None, schedule=SimpleNamespace(step=lambda: None)
    )
    tokens = torch.tensor(8.0, device="meta")
    share = pipeline.pipeline_step(runtime, input_ids=tokens, labels=tokens, global_tokens=tokens)
    assert reduced == ["meta"] and share.device.type == "meta"
