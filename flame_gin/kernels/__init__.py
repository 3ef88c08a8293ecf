"""Kernel selection: FLA's Triton kernels on GPU, or pure-PyTorch reference ops on CPU.

FLA 0.6's layers call Triton kernels that cannot run without a GPU driver. `select` installs
float32 PyTorch equivalents of every op that the families with a CPU path (GLA, DeltaNet, Gated DeltaNet,
RWKV, KDA and the others `families.Traits.cpu` names, with their norms, short convolutions, gated MLPs and
fused losses) call, so those models train on a CPU and serve as a numerical reference for the Triton path.
Call it before building the model: some layers pick their activation functions at construction.
"""

from __future__ import annotations

from typing import Iterable

import torch

from flame_gin.kernels import cache, level_scales, sdpa  # noqa: F401  (cache: re-exported as kernels.cache)

# The swap module names FLA's classes, and importing FLA takes about 12 s on a CPU: its names are served from
# here on first use (PEP 562), so a command line reports a config error before paying for it.
_FROM_SWAP = ("TABLE", "check_fla_version", "check_table", "installed", "restore")


def __getattr__(name: str):
    if name in _FROM_SWAP:
        from flame_gin.kernels import swap

        return getattr(swap, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


MODES = ("auto", "triton", "reference", "compiled")
_current = {"mode": "triton"}


def current_mode() -> str:
    """The mode the last `select` installed ("triton" before any)."""
    return _current["mode"]


def select(*, mode: str = "auto") -> str:
    """Chooses the kernel implementation and returns the mode used ("triton" or "reference").

    "auto" is "reference" when no CUDA device is available, else "triton". "reference" installs the
    PyTorch ops (idempotent; raises naming the FLA module and attribute if a name to swap is gone, or
    if the FLA version is unsupported); "triton" puts FLA's own ops back if they were swapped.
    "compiled" is for `torch.compile`d blocks: FLA's chunked GLA/DeltaNet kernels as custom ops (the
    references on CPU) and PyTorch norms, activations and convolutions that the compiler fuses.
    """
    if mode not in MODES:
        raise ValueError(f"kernel mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        mode = "triton" if torch.cuda.is_available() else "reference"
    from flame_gin.kernels import swap

    if mode in ("reference", "compiled"):
        swap.install(swap.TABLE if mode == "reference" else swap.compiled_table(on_gpu=torch.cuda.is_available()))
    else:
        swap.restore()
    sdpa.install()  # FLA's softmax attention layer without flash-attn, in every mode
    level_scales.install()  # log-linear attention's scales in the queries' dtype under autocast
    _current["mode"] = mode
    return mode


def runs_on_meta(*, layer_modules: Iterable[str], on_gpu: bool) -> bool:
    """Whether a block built from classes of `layer_modules` can run forward on meta tensors under the mode
    now selected (the memory estimate's activation probe).

    Why: FLA's Triton kernels take a meta tensor's null pointer and fault the device, an illegal memory access
    that poisons the whole process (Gated DeltaNet-340M compiled on an H100 died building its model). On a CPU
    nothing reaches a GPU. On a GPU only "compiled" mode has meta-safe blocks: FLA's norms, activations and
    convolutions are PyTorch ops there and GLA's and DeltaNet's chunked ops are custom ops with meta kernels,
    but every other FLA layer (``fla.layers.*``) keeps its Triton kernels."""
    if not on_gpu or _current["mode"] == "reference":
        return True
    if _current["mode"] != "compiled":
        return False
    from flame_gin.kernels import swap

    return all(m in swap.OPAQUE_MODULES or not m.startswith("fla.layers.") for m in layer_modules)


__all__ = [
    "MODES",
    "TABLE",
    "current_mode",
    "check_fla_version",
    "check_table",
    "installed",
    "restore",
    "runs_on_meta",
    "select",
]
