"""A flag set by preemption signals, polled by the training loop.

Schedulers warn before they stop a job (Slurm: SIGUSR2 ahead of the time
limit, SIGTERM on preemption). The handler only records the request; the
loop finishes its step, saves and exits with `REQUEUE_EXIT_CODE`, which
Slurm set-ups requeue on.
"""

from __future__ import annotations

import signal
import threading

REQUEUE_EXIT_CODE = 42
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class PreemptionFlag:
    """Installs handlers for `signals`; `requested()` turns True on one.

    Use as a context manager (or call `uninstall`) to put the previous
    handlers back. Must be created on the main thread (Python's rule).
    """

    def __init__(self, *, signals=DEFAULT_SIGNALS):
        self._event = threading.Event()
        self._signum: int | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        self._signum = signum
        self._event.set()

    def requested(self) -> bool:
        """True once one of the signals arrived."""
        return self._event.is_set()

    @property
    def signal_name(self) -> str | None:
        """Name of the signal received (e.g. 'SIGTERM'), or None."""
        return None if self._signum is None else signal.Signals(self._signum).name

    def uninstall(self) -> None:
        """Restore the handlers that were in place before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def __enter__(self) -> "PreemptionFlag":
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()
