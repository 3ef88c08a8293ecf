"""Kernel selection: FLA's Triton kernels on GPU, or pure-PyTorch reference ops on CPU.

FLA 0.6's layers call Triton kernels that cannot run without a GPU driver. `select` installs
float32 PyTorch equivalents of every op that the families with a CPU path (GLA, DeltaNet, Gated DeltaNet,
RWKV, KDA and the others `families.Traits.cpu` names, with their norms, short convolutions, gated MLPs and
fused losses) call, so those models train on a CPU and serve as a numerical reference for the Triton path.
Call it before building the model: some layers pick their activation functions at construction.
"""

from __future__ import annotations

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


__all__ = ["MODES", "TABLE", "current_mode", "check_fla_version", "check_table", "installed", "restore", "select"]
