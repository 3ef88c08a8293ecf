"""Per-block `torch.compile` that compiles a block once, not once per layer.

Every FLA block stores its integer `layer_idx`; dynamo specialises integer attributes of modules, so the
second block fails the first block's guard and recompiles, until the recompile limit sends the rest back to
eager. Treating module integers as unspecialised (`allow_unspec_int_on_nn_module`) and inlining built-in
modules (parameters become graph inputs, not guarded constants) lets all blocks share one compiled graph.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def configure_dynamo() -> None:
    """Process-wide dynamo settings that block-wise compilation relies on."""
    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    torch._dynamo.config.inline_inbuilt_nn_modules = True


def apply_compile(blocks: nn.ModuleList | nn.ModuleDict, *, backend="inductor", fullgraph: bool = False,
                  mode: str | None = None) -> None:
    """Compiles each block of `blocks` in place (`Module.compile`, so names and state_dict keys stay)."""
    configure_dynamo()
    for block in (blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks):
        block.compile(backend=backend, fullgraph=fullgraph, mode=mode, dynamic=False)
