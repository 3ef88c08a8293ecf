"""Pipeline parallel (GPipe, 1F1B, interleaved 1F1B) and PP x FSDP vs. a single-process run."""

from __future__ import annotations

import pytest

from dist_launch import launch
import dist_pipeline
from flame_gin.parallel.pipeline import stage_layer_ranges

CASES = {
    "gpipe_llama": (2, "llama", dict(pp=2), "GPipe", 1, 2),
    "1f1b_gla": (2, "gla", dict(pp=2), "1F1B", 1, 2),
    "interleaved_llama": (2, "llama", dict(pp=2), "Interleaved1F1B", 2, 4),
    "1f1b_fsdp_llama": (4, "llama", dict(pp=2), "1F1B", 1, 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pipeline_matches_single_process(case):
    world, family, dims, schedule, per_rank, micro = CASES[case]
    launch(dist_pipeline.check, world_size=world, args=(family, dims, schedule),
           kwargs=dict(stages_per_rank=per_rank, microbatches=micro))


def test_stage_ranges():
    assert stage_layer_ranges(num_layers=5, num_stages=2) == [(0, 3), (3, 5)]
    assert stage_layer_ranges(num_layers=8, num_stages=3, split_points=[2, 5]) == [(0, 2), (2, 5), (5, 8)]
    with pytest.raises(ValueError, match="split_points"):
        stage_layer_ranges(num_layers=8, num_stages=3, split_points=[5, 2])
    with pytest.raises(ValueError, match="3 stages for 2 blocks"):
        stage_layer_ranges(num_layers=2, num_stages=3)
