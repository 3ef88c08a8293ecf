"""Profiling from the config: torch profiler traces every N steps and CUDA memory snapshots, into the workdir."""

from __future__ import annotations

import contextlib
import os
import pickle

import torch
from absl import logging


class Profiler:
    """Opens a torch profiler window of ``active_steps`` every ``interval`` steps; off when interval is 0.

    Traces go to ``workdir/profile/step_<n>/`` (Chrome trace per rank). With ``memory_snapshot`` on a CUDA device,
    the allocator history is recorded from the start and dumped at the end of the first profiled window.
    """

    def __init__(
        self, *, workdir: str, rank: int, interval: int = 0, active_steps: int = 2, memory_snapshot: bool = False
    ):
        self._dir = os.path.join(workdir, "profile")
        self._rank, self._interval, self._active = rank, interval, max(1, active_steps)
        self._prof = None
        self._start_step = None
        self._snapshot = memory_snapshot and torch.cuda.is_available()
        if self._snapshot:
            torch.cuda.memory._record_memory_history(max_entries=100_000)

    def step(self, step: int) -> None:
        """Call once per completed step; opens and closes profiling windows."""
        if self._interval <= 0:
            return
        if self._prof is None and step % self._interval == 0:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities, record_shapes=True)
            self._prof.__enter__()
            self._start_step = step
        elif self._prof is not None and step - self._start_step >= self._active:
            self._close_window(step)

    def _close_window(self, step: int) -> None:
        self._prof.__exit__(None, None, None)
        out = os.path.join(self._dir, f"step_{self._start_step}")
        os.makedirs(out, exist_ok=True)
        self._prof.export_chrome_trace(os.path.join(out, f"rank{self._rank}_trace.json"))
        logging.info("profile trace for steps %d-%d written to %s", self._start_step, step, out)
        self._prof = None
        if self._snapshot:
            with open(os.path.join(out, f"rank{self._rank}_memory_snapshot.pickle"), "wb") as f:
                pickle.dump(torch.cuda.memory._snapshot(), f)
            torch.cuda.memory._record_memory_history(enabled=None)
            self._snapshot = False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._prof is not None:
                self._prof.__exit__(None, None, None)
