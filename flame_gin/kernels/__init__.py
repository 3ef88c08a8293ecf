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
_current = {"mode": "triton", "on_gpu": True}  # before any `select`: FLA's own kernels, assumed on a GPU


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
    on_gpu = torch.cuda.is_available()
    if mode == "auto":
        mode = "triton" if on_gpu else "reference"
    from flame_gin.kernels import swap

    if mode in ("reference", "compiled"):
        swap.install(swap.TABLE if mode == "reference" else swap.compiled_table(on_gpu=on_gpu))
    else:
        swap.restore()
    sdpa.install()  # FLA's softmax attention layer without flash-attn, in every mode
    level_scales.install()  # log-linear attention's scales in the queries' dtype under autocast
    _current.update(mode=mode, on_gpu=on_gpu)
    return mode


def untraced_layers(*, model: torch.nn.Module) -> list[str]:
    """The FLA layer modules (``fla.layers.*``) of `model`'s classes whose attention ops stay FLA's Triton
    kernels under the kernels now selected: none where no GPU kernels were selected (a CPU, or the reference
    mode); in compiled mode on a GPU all but GLA's and DeltaNet's (custom ops there); else all of them."""
    if _current["mode"] == "reference" or not _current["on_gpu"]:
        return []
    names = sorted({type(m).__module__ for m in model.modules() if type(m).__module__.startswith("fla.layers.")})
    if _current["mode"] != "compiled":
        return names
    from flame_gin.kernels import swap

    return [name for name in names if name not in swap.OPAQUE_MODULES]


def traceable(*, model: torch.nn.Module) -> bool:
    """Whether every op `model`'s blocks call, under the kernels now selected, is PyTorch's or one of
    flame_gin's custom ops, never an FLA Triton kernel.

    Why it matters twice. On meta tensors (the memory estimate's activation probe) a Triton kernel gets a null
    pointer and faults the GPU, an illegal memory access that poisons the process (Gated DeltaNet-340M
    compiled on an H100 died building its model). Under `torch.compile`, FLA 0.6 marks its ops
    `torch.compiler.disable`, a graph break that `fullgraph=True` refuses at the first step. On a GPU only
    "compiled" mode qualifies (FLA's norms, activations and convolutions are PyTorch's there; in triton mode
    they are FLA's kernels), and only with no `untraced_layers`."""
    if _current["on_gpu"] and _current["mode"] not in ("reference", "compiled"):
        return False
    return not untraced_layers(model=model)


__all__ = [
    "MODES",
    "TABLE",
    "current_mode",
    "check_fla_version",
    "check_table",
    "installed",
    "restore",
    "traceable",
    "untraced_layers",
    "select",
]
