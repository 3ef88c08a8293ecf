"""FLA's compiled Triton kernels and their autotuning choices, kept with the run.

Why: FLA's kernels autotune on first use, which takes minutes before the first step of a 340M model on a
fresh H100 or H200, and Triton keeps only the compiled binaries on disk by default: the choice of
configuration lives in the process. A restarted or requeued job autotunes again, on a node whose local cache
may be empty, and where two configurations time alike it may pick the other one, whose different
accumulation order changes the floating-point results: the resumed run would then not be the run it
resumes. FLA 0.6 already asks Triton to write each autotuning result beside the kernel's binaries (its
`FLA_CACHE_RESULTS`, on unless set to 0; `autotuning_persisted` checks it on FLA's GLA kernels), but into
Triton's node-local cache. `use_run_dir` points that cache (`TRITON_CACHE_DIR`) at ``WORKDIR/kernel_cache``,
so that a resumed job on any node of a shared file system loads the same binaries and the same choices.
Triton writes cache entries under a temporary name and renames them, so ranks and nodes may share the folder.
A cache folder the user named in the environment is left as it is.

A new run starts from an empty folder. `seed_choices` copies into it only the autotuning choices of an earlier
run of the same shapes (Triton's ``*.autotune.json`` files, a few KB each, against hundreds of MB of binaries):
Triton then compiles the chosen configuration of each kernel instead of timing every candidate, and the runs
of an ablation series run the same kernel configurations. Triton keys each choice by its own version, the GPU
target, the kernel's source, the tuning key (shapes, dtypes) and the candidate list, so a choice made for
another GPU architecture, Triton version or kernel source is never used: that kernel autotunes as before.

Inductor's own compiled graphs are kept separately (`flame_gin.parallel.compile`).
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import sys
import tempfile

log = logging.getLogger(__name__)

AUTOTUNE_ENV = "FLA_CACHE_RESULTS"
DIR_ENV = "TRITON_CACHE_DIR"
DIRNAME = "kernel_cache"
CHOICES = "*.autotune.json"
CHOICES_KEY = "flame_gin.run.kernel_choices_from"  # the gin key that names a source of choices
_set_by_us: dict[str, str | None] = {"dir": None}


def has_choices(folder: os.PathLike | str) -> bool:
    """Whether a Triton cache folder holds autotuning choices (a run writes them during its first step)."""
    return next(pathlib.Path(folder).rglob(CHOICES), None) is not None


def autotuning_persisted() -> bool | None:
    """Whether FLA's autotuned GLA kernels write their results to disk; None when FLA or Triton is missing.

    False when `FLA_CACHE_RESULTS=0`, or when the installed Triton cannot cache autotuning results."""
    if "fla" not in sys.modules:
        return None
    try:
        tuners = gla_autotuners()
    except ImportError:
        return None
    return bool(tuners) and all(tuner.cache_results for tuner in tuners)


def gla_autotuners() -> list:
    """The Triton autotuners of FLA's chunked GLA kernels (the module `autotuning_persisted` reads)."""
    from fla.ops.gla import chunk

    return [tuner for tuner in map(_autotuner, vars(chunk).values()) if tuner is not None]


def _autotuner(obj):
    """The Autotuner inside `obj` (FLA wraps it in `triton.heuristics`), else None."""
    from triton.runtime.autotuner import Autotuner

    for _ in range(4):
        if isinstance(obj, Autotuner):
            return obj
        obj = getattr(obj, "fn", None)
    return None


def use_run_dir(*, workdir: os.PathLike | str) -> pathlib.Path:
    """Points Triton's kernel cache at ``workdir/kernel_cache`` and returns the folder Triton will use.

    Call it before the first kernel is compiled. A `TRITON_CACHE_DIR` set by the user (not by an earlier
    call here) wins. Logs a warning when autotuning results are not persisted, naming the cause."""
    current = os.environ.get(DIR_ENV)
    if current is not None and current != _set_by_us["dir"]:
        log.info("Triton kernel cache: %s (from %s)", current, DIR_ENV)
        folder = pathlib.Path(current)
    else:
        folder = pathlib.Path(workdir) / DIRNAME
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[DIR_ENV] = _set_by_us["dir"] = str(folder)
        log.info("Triton kernel cache: %s", folder)
    if autotuning_persisted() is False:
        log.warning(
            "FLA's autotuning results are not written to the kernel cache (%s=%r): a restarted run "
            "autotunes again and may choose other kernel configurations",
            AUTOTUNE_ENV,
            os.environ.get(AUTOTUNE_ENV),
        )
    return folder


def prepare(*, workdir: pathlib.Path, in_run_dir: bool, choices: pathlib.Path | None) -> pathlib.Path:
    """The trainer's kernel-cache step, before any Triton kernel compiles on a GPU: Triton's folder is the run
    directory's (``in_run_dir``, `use_run_dir`) or the one it uses anyway, seeded with ``choices`` when given
    (`choices_source`). Returns the folder."""
    folder = use_run_dir(workdir=workdir) if in_run_dir else folder_in_use()
    if choices is not None:
        seed_choices(source=choices, folder=folder)
    return folder


def folder_in_use() -> pathlib.Path:
    """The folder Triton caches kernels in for this process: ``TRITON_CACHE_DIR``, else Triton's default."""
    if os.environ.get(DIR_ENV):
        return pathlib.Path(os.environ[DIR_ENV])
    try:  # Triton >= 3.4 reads its settings through knobs (TRITON_HOME/.triton/cache by default)
        from triton import knobs

        return pathlib.Path(knobs.cache.dir)
    except ImportError:
        from triton.runtime.cache import default_cache_dir

        return pathlib.Path(default_cache_dir())


def choices_source(*, path: os.PathLike | str) -> pathlib.Path:
    """The folder holding the autotuning choices named by ``path``: a run directory (its ``kernel_cache/``) or
    a Triton cache folder. A ``ValueError`` naming ``CHOICES_KEY`` when it holds none (the trainer reports it
    as a config error, before anything is built)."""
    folder = pathlib.Path(path).expanduser()
    if (folder / DIRNAME).is_dir():
        folder = folder / DIRNAME
    if not folder.is_dir():
        raise ValueError(f"{CHOICES_KEY}={str(path)!r}: no such folder (a run directory or a Triton cache folder)")
    if not has_choices(folder):
        raise ValueError(
            f"{CHOICES_KEY}={str(path)!r}: {folder} holds no autotuning choices ({CHOICES}); a run writes them to its "
            f"{DIRNAME}/ on a GPU once its first step is done"
        )
    return folder


def seed_choices(*, source: pathlib.Path, folder: pathlib.Path) -> int:
    """Copies the autotuning choices under ``source`` that ``folder`` lacks, in Triton's layout (one folder per
    cache key); returns how many. Each file is written under a temporary name and renamed, as Triton writes
    its own, so ranks that share ``folder`` may all call this."""
    copied = 0
    for choice in sorted(source.rglob(CHOICES)):
        target = folder / choice.relative_to(source)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")  # unique per host
        os.close(handle)
        shutil.copyfile(choice, partial)
        os.replace(partial, target)
        copied += 1
    log.info("Triton kernel cache: %d autotuning choices copied from %s into %s", copied, source, folder)
    return copied
