"""Log lines while a run's first step is under way, and its duration once it is done.

Why: the first step of a GPU run compiles and autotunes FLA's Triton kernels (and inductor's graphs in
compiled mode). On a cold kernel cache that takes minutes (GLA-340M: 473 s on an H200; GLA-1B: no first step
after 9.5 minutes on an H100), during which the run prints nothing after its model line and looks hung.
`Watch` logs, every `interval_s` seconds until the first step ends, how long it has been running and how many
entries the kernel cache holds (a growing count shows the autotuning at work); then it logs the first step's
duration, which also shows what a warm cache saved on a resumed run. A first step that ran past one line and
left autotuning choices in the cache ends with the binding that lets a new run of the same shapes start from
them (`flame_gin.kernels.cache.seed_choices`).
"""

from __future__ import annotations

import os
import pathlib
import threading
import time
from typing import Callable

from absl import logging

from flame_gin.kernels import cache as kernel_cache

INTERVAL_S = 60.0


def cache_entries(folder: os.PathLike | str | None) -> int | None:
    """Entries (one per compiled kernel or autotuning result) in Triton's cache folder; None without one."""
    if folder is None or not pathlib.Path(folder).is_dir():
        return None
    return sum(1 for _ in pathlib.Path(folder).iterdir())


class Watch:
    """Started before the loop, stopped after the first step (or when the loop fails before it).

    ``cache_dir`` is read at each line (Triton's cache folder, as `flame_gin.kernels.cache` sets it, when the
    caller gives none);
    ``log`` takes one formatted line (absl's INFO by default). A watch not ``enabled`` (the ranks other than
    the primary) starts no thread and logs nothing."""

    def __init__(
        self,
        *,
        enabled: bool = True,
        interval_s: float | None = None,
        cache_dir: Callable[[], str | None] = lambda: os.environ.get(kernel_cache.DIR_ENV),
        log: Callable[[str], None] = logging.info,
    ):
        self._enabled = enabled
        self._interval = INTERVAL_S if interval_s is None else interval_s
        self._cache_dir, self._log = cache_dir, log
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0.0

    def start(self) -> None:
        if not self._enabled:
            return
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._beat, name="first-step-watch", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._done.wait(self._interval):
            entries = cache_entries(self._cache_dir())
            cache = f"; the kernel cache holds {entries} entries" if entries is not None else ""
            self._log(
                f"first step still running after {time.perf_counter() - self._start:.0f} s: kernels compile and "
                f"autotune on first use, minutes on a cold cache{cache}"
            )

    def stop(self, *, completed: bool) -> float | None:
        """Ends the lines; logs and returns the first step's seconds when ``completed``. Safe to call twice."""
        if self._thread is None or self._done.is_set():
            return None
        self._done.set()
        self._thread.join()
        if not completed:
            return None
        seconds = time.perf_counter() - self._start
        self._log(f"first step done in {seconds:.1f} s")
        folder = self._cache_dir()
        if seconds >= self._interval and folder and pathlib.Path(folder).is_dir() and kernel_cache.has_choices(folder):
            self._log(
                "a new run of the same shapes can start from these autotuning choices instead of timing every "
                f"candidate again: --gin.{kernel_cache.CHOICES_KEY}={folder}"
            )
        return seconds
