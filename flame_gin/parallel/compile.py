"""Per-block `torch.compile` that compiles a block once, not once per layer.

Every FLA block stores its integer `layer_idx`; dynamo specialises integer attributes of modules, so the
second block fails the first block's guard and recompiles, until the recompile limit sends the rest back to
eager. Treating module integers as unspecialised (`allow_unspec_int_on_nn_module`; parameters are graph
inputs, not guarded constants, since torch 2.5) lets all blocks share one compiled graph. FLA's chunked
attention ops are hidden from dynamo (`torch.compiler.disable`), a graph break per block: the "compiled"
kernel mode (`flame_gin.run.kernel_mode`) puts them behind custom ops, and on GPU anything else is warned.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from flame_gin import kernels

log = logging.getLogger(__name__)


def configure_dynamo() -> None:
    """Process-wide dynamo settings that block-wise compilation relies on."""
    torch._dynamo.config.allow_unspec_int_on_nn_module = True


def apply_compile(blocks: nn.ModuleList | nn.ModuleDict, *, backend="inductor", fullgraph: bool = False,
                  mode: str | None = None) -> None:
    """Compiles each block of `blocks` in place (`Module.compile`, so names and state_dict keys stay)."""
    configure_dynamo()
    if torch.cuda.is_available() and kernels.current_mode() != "compiled":
        log.warning("compiling blocks with kernel mode %r: FLA's attention ops break every block's graph; "
                    "set flame_gin.run.kernel_mode = 'compiled' (gin/parallel/compile.gin)", kernels.current_mode())
    for block in (blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks):
        block.compile(backend=backend, fullgraph=fullgraph, mode=mode, dynamic=False)
