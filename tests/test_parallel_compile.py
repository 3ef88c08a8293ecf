"""Per-block compile: all blocks share compiled graphs instead of recompiling once per layer (`layer_idx`), and
a resumed run compiles from the artifacts its first process left in the workdir."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import dist_models
import pytest
import torch
from graph_count import GraphCounter
from torch._dynamo.utils import counters
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

from flame_gin.parallel.compile import CACHE_FILE, apply_compile, load_compile_cache, save_compile_cache

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY_COMPILED = ["--gin_file=gin/tiny.gin", "--gin_file=gin/parallel/compile.gin"]


def _compiles(layers: int) -> tuple[int, torch.Tensor]:
    torch._dynamo.reset()
    counter = GraphCounter()
    model = dist_models.build("gla", layers=layers)
    apply_compile(model.model.layers, backend=counter)
    ids = torch.arange(8).unsqueeze(0)
    logits = model(input_ids=ids).logits
    logits.sum().backward()
    return counter.count, logits


def test_blocks_compile_once_not_per_layer():
    try:
        graphs_2, _ = _compiles(2)
        graphs_4, logits = _compiles(4)
    finally:
        torch._dynamo.reset()
    assert graphs_4 == graphs_2, (graphs_2, graphs_4)  # independent of depth: no per-layer recompilation
    eager = dist_models.build("gla", layers=4)(input_ids=torch.arange(8).unsqueeze(0)).logits
    torch.testing.assert_close(logits, eager)


@pytest.mark.slow
def test_a_resume_on_a_node_with_an_empty_cache_compiles_from_the_workdir_artifacts(tmp_path, train_tiny):
    workdir = tmp_path / "run"
    first = subprocess.run(
        [
            sys.executable,
            "-m",
            "flame_gin.train",
            *TINY_COMPILED,
            f"--workdir={workdir}",
            "--gin.TRAIN_STEPS=2",
            "--gin.WARMUP_STEPS=0",
            "--gin.CHECKPOINT_INTERVAL=2",
            "--gin.flame_gin.evaluation.interval=0",
        ],
        cwd=ROOT,
        env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "node_a")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    artifacts = (workdir / CACHE_FILE).read_bytes()
    assert artifacts
    with temporary_cache_dir(str(tmp_path / "node_b")):  # this process plays a fresh node: nothing cached
        torch._dynamo.reset()
        counters.clear()
        train_tiny(workdir, gin_files=("gin/parallel/compile.gin",))
        hits = counters["aot_autograd"]["autograd_cache_hit"] + counters["inductor"]["fxgraph_cache_hit"]
        misses = counters["aot_autograd"]["autograd_cache_miss"] + counters["inductor"]["fxgraph_cache_miss"]
        torch._dynamo.reset()
    assert hits >= 1 and misses == 0, dict(counters)
    assert (workdir / CACHE_FILE).read_bytes() == artifacts  # the resume left the file it loaded as it was


def test_a_broken_compile_cache_never_stops_training(tmp_path, monkeypatch):
    (tmp_path / CACHE_FILE).write_bytes(b"not a cache")
    assert load_compile_cache(workdir=tmp_path) is False  # unreadable: logged, compile anew
    assert load_compile_cache(workdir=tmp_path / "absent") is False

    def fail():
        raise OSError("disk full")

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", fail)
    assert save_compile_cache(workdir=tmp_path) is False
    assert sorted(p.name for p in tmp_path.iterdir()) == [CACHE_FILE]  # the old file kept, no temporary left
