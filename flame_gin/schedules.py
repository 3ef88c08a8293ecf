"""Learning-rate schedules as pure functions of the step.

A schedule is a pure function ``step -> lr multiplier`` (1.0 at the peak), so that a resumed run recomputes
exactly the same learning rate from the step alone: nothing about the schedule needs to be checkpointed
beyond the step itself. Each schedule has a linear warmup from 0 and decays to ``min_lr_ratio`` of the peak.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

from absl import logging

Schedule = Callable[[int], float]


def _check(*, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> None:
    if total_steps < 0:
        raise ValueError(f"schedule: total_steps must be >= 0, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"schedule: warmup_steps={warmup_steps} must be >= 0")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"schedule: min_lr_ratio={min_lr_ratio} must lie in [0, 1]")


def _warmup(step: int, warmup_steps: int) -> float | None:
    """The warmup factor, or None once warmup is over. Step 0 gets 1/(warmup+1), never exactly 0."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return None


def cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warmup, then a half cosine from 1 down to ``min_lr_ratio`` at ``total_steps``."""
    w = _warmup(step, warmup_steps)
    if w is not None:
        return w
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warmup, then a straight line from 1 down to ``min_lr_ratio`` at ``total_steps``."""
    w = _warmup(step, warmup_steps)
    if w is not None:
        return w
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - (1.0 - min_lr_ratio) * progress


def wsd(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
    decay_ratio: float = 0.1,
    decay_shape: str = "sqrt",
) -> float:
    """Warmup-stable-decay: warmup, a flat stretch at 1, then the last ``decay_ratio`` of training decays.

    ``decay_shape`` is ``"linear"``, ``"cosine"`` or ``"sqrt"`` (1 - sqrt(progress)), the shapes used in
    WSD pre-training recipes.
    """
    if not 0.0 <= decay_ratio <= 1.0:
        raise ValueError(f"wsd: decay_ratio={decay_ratio} must lie in [0, 1]")
    if decay_shape not in ("linear", "cosine", "sqrt"):
        raise ValueError(f"wsd: unknown decay_shape {decay_shape!r}; expected 'linear', 'cosine' or 'sqrt'")
    w = _warmup(step, warmup_steps)
    if w is not None:
        return w
    decay_steps = int(round(decay_ratio * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start or decay_steps == 0:
        return 1.0
    progress = min(1.0, (step - decay_start) / decay_steps)
    if decay_shape == "linear":
        shape = 1.0 - progress
    elif decay_shape == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - math.sqrt(progress)
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


_SCHEDULES = {"cosine": cosine, "linear": linear, "wsd": wsd}


def make_schedule(*, name: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0, **kwargs) -> Schedule:
    """The schedule ``name`` with its arguments bound, validated up front: ``step -> multiplier``."""
    if name not in _SCHEDULES:
        raise ValueError(f"Unknown LR schedule {name!r}; expected one of {sorted(_SCHEDULES)}")
    _check(warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio)
    if warmup_steps > total_steps:  # a shortened smoke run of an experiment: warm up over the whole run
        logging.warning(
            "schedule: warmup_steps=%d is longer than the run (%d steps); warming up over %d steps",
            warmup_steps,
            total_steps,
            total_steps,
        )
        warmup_steps = total_steps
    fn = functools.partial(
        _SCHEDULES[name], warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio, **kwargs
    )
    fn(0)  # surfaces bad keyword arguments now, not at the first step
    return fn
