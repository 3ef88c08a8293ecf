"""Per-block compile: all blocks share compiled graphs instead of recompiling once per layer (`layer_idx`)."""

from __future__ import annotations

import torch

import dist_models
from flame_gin.parallel.compile import apply_compile
from graph_count import GraphCounter


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
