"""Cheap checks of a run's settings, made before anything is built or written.

Why a module of its own: each mistake a user makes in a gin file or a flag should stop the run in seconds
with a ``ConfigError`` naming the setting and the value, not minutes later (after the model is built and the
data opened) with a traceback from deep inside torch, FLA or the file system, and not after a run directory
has been left behind. The trainer calls these first; each is a plain function of the values it checks.
"""

from __future__ import annotations

import math
import os
import pathlib

from flame_gin import families
from flame_gin.config import ConfigError
from flame_gin.kernels import MODES as KERNEL_MODES  # the modes kernels.select knows, one definition


def scalars(*, train_steps: int, seq_len: int, lr) -> None:
    """The run's own numbers, checked before anything is imported or built (a typo is reported in seconds)."""
    if train_steps < 0:
        raise ConfigError(f"TRAIN_STEPS={train_steps} must be >= 0")
    if seq_len <= 0:
        raise ConfigError(f"SEQ_LEN={seq_len} must be positive")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"LR={lr!r} (flame_gin.adamw.lr) must be a positive number")


def batch(*, batch_size: int, grad_accum_steps: int, dp_size: int | None = None) -> int:
    """The global batch against the accumulation steps and, once the mesh is known, the data-parallel size
    (None: before the mesh, which needs the model config); returns the per-rank micro-batch size."""
    if grad_accum_steps < 1:
        raise ConfigError(f"flame_gin.run.grad_accum_steps={grad_accum_steps} must be >= 1")
    per_step = (1 if dp_size is None else dp_size) * grad_accum_steps
    if batch_size <= 0 or batch_size % per_step:
        divisor = (
            f"gradient accumulation {grad_accum_steps} (and of the data-parallel size)"
            if dp_size is None
            else f"data-parallel size {dp_size} x gradient accumulation {grad_accum_steps} = {per_step}"
        )
        raise ConfigError(f"BATCH_SIZE={batch_size} (global, in sequences) must be a positive multiple of {divisor}")
    return batch_size // per_step


def whole_number(value, *, name: str, minimum: int, what: str = "a whole number") -> None:
    """``value`` (the setting ``name``) is an int, not a bool, and at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be {what} >= {minimum}")


def evaluation(*, interval, batches) -> None:
    """The held-out evaluation's settings (``flame_gin.evaluation``)."""
    whole_number(interval, name="flame_gin.evaluation.interval", minimum=0, what="a whole number of steps")
    whole_number(batches, name="flame_gin.evaluation.batches", minimum=1)


def run_numbers(
    *,
    train_steps: int,
    batch_size: int,
    grad_accum_steps: int,
    dp_size: int,
    seq_len: int,
    lr,
    model_config,
    vocab_size: int | None,
    varlen: bool,
) -> int:
    """The run's numbers against each other and the model; returns the per-rank micro-batch size."""
    scalars(train_steps=train_steps, seq_len=seq_len, lr=lr)
    micro_batch = batch(batch_size=batch_size, grad_accum_steps=grad_accum_steps, dp_size=dp_size)
    if vocab_size is not None and vocab_size > model_config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {vocab_size} tokens but the model's vocab_size is {model_config.vocab_size}; "
            f"set VOCAB_SIZE >= {vocab_size}"
        )
    head_groups(model_config)
    if varlen and not families.supports_varlen(model_config):
        raise ConfigError(
            f"varlen packing needs layers that honour cu_seqlens; model family {model_config.model_type!r} would "
            f"let documents see each other. Turn varlen off for this family."
        )
    return micro_batch


def head_groups(model_config) -> None:
    """Grouped-query attention: the query heads split evenly over the key/value heads. A model built otherwise
    constructs fine and fails only at its first forward, deep in SDPA ("size of tensor a (2) must match ...")."""
    pairs = [
        ("NUM_HEADS", "num_attention_heads", "NUM_KV_HEADS", "num_key_value_heads", vars(model_config)),
        ("NUM_HEADS", "num_heads", "NUM_KV_HEADS", "num_kv_heads", vars(model_config)),
        ("ATTN_HEADS", "num_heads", "ATTN_KV_HEADS", "num_kv_heads", getattr(model_config, "attn", None) or {}),
    ]
    for macro, heads_key, kv_macro, kv_key, values in pairs:
        heads, kv = values.get(heads_key), values.get(kv_key)
        if isinstance(heads, int) and isinstance(kv, int) and (kv < 1 or heads % kv):
            raise ConfigError(
                f"{kv_key}={kv} ({kv_macro}) must divide {heads_key}={heads} ({macro}) of model family "
                f"{model_config.model_type!r}: each key/value head serves a whole group of query heads"
            )


def kernel_mode(*, mode: str, cuda: bool) -> None:
    """``flame_gin.run.kernel_mode`` is known, and ``triton`` only where there is a GPU to run Triton on."""
    if mode not in KERNEL_MODES:
        raise ConfigError(f"flame_gin.run.kernel_mode={mode!r}: expected one of {', '.join(map(repr, KERNEL_MODES))}")
    if mode == "triton" and not cuda:
        raise ConfigError(
            "flame_gin.run.kernel_mode='triton' needs a CUDA GPU (FLA's Triton kernels cannot run on "
            "a CPU); use 'auto' or 'reference' here"
        )


def workdir(path: str | os.PathLike) -> None:
    """The run directory can be created or written: not a file, not read-only."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--workdir={str(path)!r} is a file, not a directory")
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir={str(path)!r}: {str(existing)!r} is not writable")
