"""Kernel selection: FLA's Triton kernels on GPU, or pure-PyTorch reference ops on CPU.

FLA 0.6's layers call Triton kernels that cannot run without a GPU driver. `select` installs
float32 PyTorch equivalents of every op that GLA, DeltaNet and Gated DeltaNet models (and their
norms, short convolutions, gated MLPs and fused losses) call, so those models train on a CPU and
serve as a numerical reference for the Triton path. Call it before building the model: some layers
pick their activation functions at construction.
"""

from __future__ import annotations

import torch

from flame_gin.kernels.swap import TABLE, check_fla_version, check_table, installed, restore

MODES = ("auto", "triton", "reference")


def select(*, mode: str = "auto") -> str:
    """Chooses the kernel implementation and returns the mode used ("triton" or "reference").

    "auto" is "reference" when no CUDA device is available, else "triton". "reference" installs the
    PyTorch ops (idempotent; raises naming the FLA module and attribute if a name to swap is gone, or
    if the FLA version is unsupported); "triton" puts FLA's own ops back if they were swapped.
    """
    if mode not in MODES:
        raise ValueError(f"kernel mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        mode = "triton" if torch.cuda.is_available() else "reference"
    if mode == "reference":
        from flame_gin.kernels import swap

        swap.install()
    else:
        restore()
    return mode


__all__ = ["MODES", "TABLE", "check_fla_version", "check_table", "installed", "restore", "select"]
