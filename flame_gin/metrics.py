"""Metric writers from CLU, on the primary process only, without TensorFlow.

``clu.metric_writers`` imports its TensorFlow summary writer at package import; TensorFlow is a multi-GB
dependency this trainer does not need, so when it is absent a stand-in for that one submodule is registered
first. TensorBoard event files are written by CLU's ``TorchTensorboardWriter`` (torch's SummaryWriter), which
has no text support: texts (the config) go to a plain text event through torch's writer directly.

CLU's writer interface imports JAX (about 0.6 s), so CLU is imported when the writers are created, not when this
module is: a config error is reported before then. A writer is anything with CLU's ``MetricWriter`` methods.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import types
from typing import Any, Callable, Mapping, Sequence

_SUMMARY_MODULE = "clu.metric_writers.summary_writer"


def _import_clu_writers():
    if _SUMMARY_MODULE not in sys.modules and importlib.util.find_spec("tensorflow") is None:
        stub = types.ModuleType(_SUMMARY_MODULE)

        class SummaryWriter:  # noqa: D401 - stand-in, refuses use
            def __init__(self, *args, **kwargs):
                raise ImportError(
                    "clu's SummaryWriter needs TensorFlow; flame_gin writes TensorBoard files through "
                    "TorchTensorboardWriter instead"
                )

        stub.SummaryWriter = SummaryWriter
        sys.modules[_SUMMARY_MODULE] = stub
    from clu import metric_writers
    from clu.metric_writers import torch_tensorboard_writer

    return metric_writers, torch_tensorboard_writer


@functools.cache
def _writer_classes():
    """CLU's module and flame_gin's two writer classes over it, defined on first use (see the docstring)."""
    metric_writers, torch_tb = _import_clu_writers()

    class TensorboardWriter(torch_tb.TorchTensorboardWriter):
        """CLU's torch TensorBoard writer plus text summaries (the resolved config, notes), and hyperparameters
        in the run's own event file: torch's ``add_hparams`` (which CLU calls) opens a separate timestamped run,
        so TensorBoard showed the hyperparameters apart from the curves they belong to."""

        def write_texts(self, step: int, texts: Mapping[str, str]):
            for key, value in texts.items():
                self._writer.add_text(key, value, global_step=step)

        def write_hparams(self, hparams: Mapping[str, Any]):
            from torch.utils.tensorboard.summary import hparams as hparams_summaries

            values = {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in hparams.items()}
            for summary in hparams_summaries(values, {}):
                self._writer.file_writer.add_summary(summary)

    class ConsoleWriter(metric_writers.LoggingWriter):
        """CLU's logging writer without texts: the resolved config is in the run directory and TensorBoard, and
        hundreds of lines of it on the console hide the progress lines."""

        def write_texts(self, step: int, texts: Mapping[str, str]):
            pass

    return metric_writers, TensorboardWriter, ConsoleWriter


def __getattr__(name: str):
    """``MetricWriter`` (CLU's interface, named in annotations), importing CLU on first use."""
    if name == "MetricWriter":
        return _writer_classes()[0].MetricWriter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_writer(entry) -> bool:
    """A writer object (CLU's methods), not a writer class or factory still to be called with ``workdir``."""
    return hasattr(entry, "write_scalars") and not isinstance(entry, type)


def create_writers(
    *,
    workdir: str | os.PathLike | None,
    is_primary: bool,
    tensorboard: bool = True,
    log_to_console: bool = True,
    asynchronous: bool = True,
    extra: Sequence[Any | Callable[..., Any]] = (),
) -> Any:
    """One writer fanning out to logging, TensorBoard (``workdir/tensorboard``) and ``extra`` writers.

    Non-primary processes get a writer that drops everything, so callers never branch on rank. An ``extra``
    entry is a writer, or a factory called as ``factory(workdir=...)`` on the primary process only (bind it
    without parentheses, ``[@flame_gin.wandb_writer]``: nothing is opened on the other ranks). TensorBoard and
    extra writers run on a background thread when ``asynchronous`` (file I/O off the training loop).
    """
    metric_writers, TensorboardWriter, ConsoleWriter = _writer_classes()
    if not is_primary:
        return metric_writers.MultiWriter([])
    slow = [w if _is_writer(w) else w(workdir=None if workdir is None else os.fspath(workdir)) for w in extra]
    if tensorboard and workdir is not None:
        slow.append(TensorboardWriter(os.path.join(os.fspath(workdir), "tensorboard")))
    if asynchronous and slow:
        slow = [metric_writers.AsyncMultiWriter(slow)]
    writers = ([ConsoleWriter()] if log_to_console else []) + slow
    return metric_writers.MultiWriter(writers)


def format_progress(*, step: int, total_steps: int, scalars: Mapping[str, Any], eta_seconds: float | None) -> str:
    """The human progress line: step, loss, tokens/s and ETA."""
    parts = [f"step {step}/{total_steps}"]
    if "loss" in scalars:
        parts.append(f"loss {scalars['loss']:.4f}")
    if "tokens_per_second" in scalars:
        parts.append(f"{scalars['tokens_per_second']:,.0f} tok/s")
    if "mfu" in scalars:
        parts.append(f"mfu {100 * scalars['mfu']:.1f}%")
    if eta_seconds is not None:
        minutes, seconds = divmod(int(eta_seconds), 60)
        hours, minutes = divmod(minutes, 60)
        parts.append(f"eta {hours:d}:{minutes:02d}:{seconds:02d}")
    return " | ".join(parts)
