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
