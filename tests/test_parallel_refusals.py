"""Parallel layouts a run cannot apply are refused before anything is built, by name: pipeline with context
parallel, tensor parallel for a family without a plan, a batch the data-parallel size does not divide; the
process group's settings are checked and exported before the group exists. In process, no mesh needed.
"""

import functools
import os

import pytest


def _tiny_config():
    from flame_gin import models

    return models.build_config(
        family="gla", overrides=dict(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=64)
    )


def test_pipeline_with_context_parallel_is_a_config_error():
    from flame_gin import assembly
    from flame_gin import config as config_lib
    from flame_gin.mesh import ParallelDims

    with pytest.raises(config_lib.ConfigError, match=r"ParallelDims.pp=2 with ParallelDims.cp=2"):
        assembly.parallel_degrees(
            make=functools.partial(ParallelDims, pp=2, cp=2),
            world_size=4,
            batch_size=4,
            seq_len=64,
            varlen=False,
            model_config=_tiny_config(),
        )


def test_tensor_parallel_for_a_family_without_a_plan_is_refused_before_anything_is_built():
    import fla  # noqa: F401 - registers FLA's configs
    from transformers import AutoConfig

    from flame_gin import assembly
    from flame_gin.mesh import ParallelDims

    config = AutoConfig.for_model("gated_deltaproduct", hidden_size=32, num_heads=2, num_hidden_layers=1, vocab_size=64)
    with pytest.raises(
        ValueError, match="tensor parallel: no plan for model family 'gated_deltaproduct'; families with a plan: "
    ):
        assembly.parallel_degrees(
            make=functools.partial(ParallelDims, tp=2),
            world_size=2,
            batch_size=2,
            seq_len=64,
            varlen=False,
            model_config=config,
        )


def test_bad_split_is_a_config_error_before_anything_is_built():
    from flame_gin import assembly

    with pytest.raises(ValueError, match="not divisible by the data-parallel size 4"):
        assembly.parallel_degrees(
            make=None, world_size=4, batch_size=6, seq_len=64, varlen=False, model_config=_tiny_config()
        )


def test_nccl_trace_buffer_is_exported_before_the_group_and_bad_timeouts_refused(monkeypatch):
    from flame_gin import process

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("TORCH_NCCL_TRACE_BUFFER_SIZE", raising=False)
    monkeypatch.delenv("TORCH_FR_BUFFER_SIZE", raising=False)
    process.init(device_type="cpu", nccl_trace_buffer_size=4096)
    assert os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] == os.environ["TORCH_FR_BUFFER_SIZE"] == "4096"
    with pytest.raises(ValueError, match="timeout_seconds=0 must be positive"):
        process.init(device_type="cpu", timeout_seconds=0)
    with pytest.raises(ValueError, match="nccl_trace_buffer_size=-1"):
        process.init(device_type="cpu", nccl_trace_buffer_size=-1)
