"""Per-block `torch.compile` that compiles a block once, not once per layer.

Every FLA block stores its integer `layer_idx`; dynamo specialises integer attributes of modules, so the
second block fails the first block's guard and recompiles, until the recompile limit sends the rest back to
eager. Treating module integers as unspecialised (`allow_unspec_int_on_nn_module`; parameters are graph
inputs, not guarded constants, since torch 2.5) lets all blocks share one compiled graph. FLA's chunked
attention ops are hidden from dynamo (`torch.compiler.disable`), a graph break per block: the "compiled"
kernel mode (`flame_gin.run.kernel_mode`) puts them behind custom ops, and on GPU anything else is warned.

The compiled artifacts are also kept in the run directory after the first step and loaded by a resumed run
(`load_compile_cache`/`save_compile_cache`): a cold compile of GLA-340M's block takes ~13 s before the first
step on an H100, a warm one ~3 s, and a requeued job often lands on a node whose local cache is empty.
"""

from __future__ import annotations

import logging
import os
import pathlib

import torch
import torch.nn as nn

from flame_gin import kernels

log = logging.getLogger(__name__)


def configure_dynamo() -> None:
    """Process-wide dynamo settings that block-wise compilation relies on."""
    torch._dynamo.config.allow_unspec_int_on_nn_module = True


def apply_compile(
    blocks: nn.ModuleList | nn.ModuleDict, *, backend="inductor", fullgraph: bool = False, mode: str | None = None
) -> None:
    """Compiles each block of `blocks` in place (`Module.compile`, so names and state_dict keys stay)."""
    configure_dynamo()
    if torch.cuda.is_available() and kernels.current_mode() != "compiled":
        log.warning(
            "compiling blocks with kernel mode %r: FLA's attention ops break every block's graph; "
            "set flame_gin.run.kernel_mode = 'compiled' (gin/parallel/compile.gin)",
            kernels.current_mode(),
        )
    for block in blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks:
        block.compile(backend=backend, fullgraph=fullgraph, mode=mode, dynamic=False)


CACHE_FILE = "compile_cache.bin"


def load_compile_cache(*, workdir) -> bool:
    """Seeds inductor's and AOTAutograd's local caches with the artifacts an earlier process of this run saved
    (`save_compile_cache`), so a resumed run compiles its blocks from cache even on another machine, where
    the node-local cache directory is empty. Artifacts made by another torch version or device simply miss;
    an unreadable file is logged and ignored (compiling anew is always correct). Returns whether any loaded."""
    path = pathlib.Path(workdir) / CACHE_FILE
    if not path.is_file():
        return False
    try:
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as err:  # a truncated or foreign file: compile from scratch
        log.warning("compile cache %s not loaded (%s: %s); compiling anew", path, type(err).__name__, err)
        return False
    loaded = {kind: len(items) for kind, items in info.artifacts.items()} if info is not None else {}
    log.info("compile cache loaded from %s: %s", path, loaded or "nothing for this torch version")
    return bool(loaded)


def save_compile_cache(*, workdir) -> bool:
    """Writes the artifacts this process compiled so far to the run directory (written to a temporary name and
    renamed, so a reader never sees half a file); nothing when nothing was compiled. Returns whether written."""
    path = pathlib.Path(workdir) / CACHE_FILE
    tmp = path.with_name(f".{CACHE_FILE}.{os.getpid()}.tmp")
    try:
        saved = torch.compiler.save_cache_artifacts()
        if saved is None or not saved[0]:
            return False
        tmp.write_bytes(saved[0])
        os.replace(tmp, path)
    except Exception as err:  # only a speed-up for later starts: training goes on without it
        log.warning("compile cache not saved to %s (%s: %s)", path, type(err).__name__, err)
        tmp.unlink(missing_ok=True)
        return False
    log.info("compile cache saved to %s (%d bytes)", path, len(saved[0]))
    return True
