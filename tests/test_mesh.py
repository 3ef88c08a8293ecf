"""ParallelDims: inference of dp_shard, validation errors (world size, heads, layers, batch), rank layout,
and the named meshes (`_mesh_worker`, run on 4 gloo processes by test_parallel_dist.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from flame_gin.mesh import ParallelDims
from flame_gin.parallel.context import check_context_parallel_config


def test_infers_dp_shard_and_data_ranks():
    dims = ParallelDims(world_size=16, dp_replicate=2, tp=2, pp=2)
    assert dims.dp_shard == 2 and dims.dp_size == 4
    # tp is the fastest-varying dimension: ranks 0 and 1 are tensor peers reading the same data
    assert dims.dp_rank(rank=0) == dims.dp_rank(rank=1) == 0
    assert dims.coordinates(rank=3) == {"tp": 1, "cp": 0, "dp_shard": 1, "dp_replicate": 0, "pp": 0}
    assert sorted({dims.dp_rank(rank=r) for r in range(16)}) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(world_size=8, tp=3), "does not divide world_size=8"),
        (dict(world_size=8, dp_shard=3, tp=2), "!= world_size=8"),
        (dict(world_size=8, tp=0), "tp must be an integer >= 1"),
        (dict(world_size=8, dp_shard=-2), "dp_shard must be -1"),
    ],
)
def test_bad_shapes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims(**kwargs)


def test_validate_for_model():
    config = LlamaConfig(
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=6,
        num_hidden_layers=2,
        intermediate_size=96,
        vocab_size=128,
    )
    with pytest.raises(ValueError, match="tp=4 does not divide num_attention_heads=6"):
        ParallelDims(world_size=4, tp=4).validate_for_model(config=config)
    with pytest.raises(ValueError, match="pp=4 is larger than num_hidden_layers=2"):
        ParallelDims(world_size=4, pp=4).validate_for_model(config=config)
    with pytest.raises(ValueError, match="context parallel: no linear-attention path for model family 'llama'"):
        check_context_parallel_config(config=config)
    ParallelDims(world_size=4, tp=2, pp=2).validate_for_model(config=config)


def test_validate_for_batch():
    dims = ParallelDims(world_size=8, cp=2, tp=2)
    with pytest.raises(ValueError, match="global batch size 3 is not divisible by the data-parallel size 2"):
        dims.validate_for_batch(global_batch_size=3, seq_len=64)
    with pytest.raises(ValueError, match="seq_len=30 is not divisible by cp\\*tp=4"):
        dims.validate_for_batch(global_batch_size=4, seq_len=30)
    dims.validate_for_batch(global_batch_size=4, seq_len=64)


def _mesh_worker(rank, world):
    dims = ParallelDims(world_size=world, dp_replicate=2, cp=2)
    mesh = dims.build(device_type="cpu")
    assert mesh.mesh_dim_names == ("pp", "dp_replicate", "dp_shard", "cp", "tp")
    assert mesh["dp"].size() == 2 and mesh["dp_shard_cp"].size() == 2 and mesh["dp_cp"].size() == 4
    assert mesh["cp"].get_local_rank() == rank % 2
    assert mesh["dp"].get_local_rank() == dims.dp_rank(rank=rank)
    one = torch.ones(())
    torch.distributed.all_reduce(one, group=mesh["dp_cp"].get_group())
    assert one.item() == 4


def test_hybrids_are_refused_for_context_parallel_and_checked_for_tensor_parallel():
    from flame_gin import models

    def hybrid(**attn):
        return models.build_config(family="gla", overrides={"num_hidden_layers": 4}, attn={"layers": [3], **attn})

    with pytest.raises(ValueError, match=r"cp=2 with softmax attention layers .* linear-attention layers only"):
        ParallelDims(world_size=2, cp=2).validate_for_model(config=hybrid(num_heads=4))
    with pytest.raises(ValueError, match=r"tp=2 does not divide attn num_kv_heads=1 of GLAConfig"):
        ParallelDims(world_size=2, tp=2).validate_for_model(config=hybrid(num_heads=4, num_kv_heads=1))
    with pytest.raises(ValueError, match=r"tp=2 does not divide attn num_heads=3 of GLAConfig"):
        ParallelDims(world_size=2, tp=2).validate_for_model(config=hybrid(num_heads=3))
    ParallelDims(world_size=2, tp=2).validate_for_model(config=hybrid(num_heads=4, num_kv_heads=2))
    ParallelDims(world_size=2, pp=2).validate_for_model(config=hybrid(num_heads=4))


def test_a_routing_family_is_refused_for_pipeline_stages():
    from flame_gin import models

    mom = models.build_config(family="mom", overrides={"num_hidden_layers": 4})
    with pytest.raises(ValueError, match=r"pp=2 with MomConfig: .*balance term"):
        ParallelDims(world_size=2, pp=2).validate_for_model(config=mom)
    ParallelDims(world_size=2, dp_shard=2).validate_for_model(config=mom)
