"""A Weights & Biases metric writer with CLU's writer methods (optional extra: ``pip install .[wandb]``).

One W&B run per training run, whatever the number of processes and restarts: only global rank 0 opens it
(another rank's writer drops everything, so a binding evaluated on every rank is harmless), and its id is
kept in the run directory (``wandb_run_id``) so a resumed or requeued job continues the same W&B run instead
of opening a new one. The resolved gin config and the run's hyper-parameters land in the run's config.
It has every method of CLU's ``MetricWriter`` without subclassing it: CLU's interface imports JAX, which a
config error should not wait for (``flame_gin.metrics``).
"""

from __future__ import annotations

import os
import pathlib
import secrets
from typing import Any, Mapping

RUN_ID_FILE = "wandb_run_id"


def _global_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


class WandbWriter:
    """Sends scalars, texts and hparams to the run's W&B run; imported lazily so the extra stays optional.

    ``workdir`` (given by ``flame_gin.metric_writers`` when the writer is bound without parentheses,
    ``extra = [@flame_gin.wandb_writer]``) holds the run id file and W&B's own files (unless ``directory``).
    """

    def __init__(
        self,
        *,
        project: str,
        name: str | None = None,
        directory: str | None = None,
        mode: str | None = None,
        workdir: str | None = None,
        entity: str | None = None,
    ):
        self._run = None
        if _global_rank() != 0:
            return
        try:
            import wandb
        except ImportError as e:
            raise ImportError("WandbWriter needs the 'wandb' package: pip install 'flame_gin[wandb]'") from e
        run_id = None
        if workdir is not None:
            pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
            id_file = pathlib.Path(workdir) / RUN_ID_FILE
            if id_file.is_file():
                run_id = id_file.read_text().strip()
            else:
                run_id = secrets.token_hex(4)  # W&B ids: lowercase letters and digits
                id_file.write_text(run_id + "\n")
        self._run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            dir=directory or workdir,
            mode=mode,
            id=run_id,
            resume="allow" if run_id else None,
        )

    def write_summaries(self, step: int, values: Mapping[str, Any], metadata=None):
        if self._run is not None:
            self._run.log(dict(values), step=step)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        if self._run is not None:
            self._run.log({k: float(v) for k, v in scalars.items()}, step=step)

    def write_images(self, step: int, images: Mapping[str, Any]):
        if self._run is not None:
            import wandb

            self._run.log({k: wandb.Image(v) for k, v in images.items()}, step=step)

    def write_videos(self, step: int, videos: Mapping[str, Any]):
        pass

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
        pass

    def write_texts(self, step: int, texts: Mapping[str, str]):
        """Texts (the resolved gin config) go to the run's config, where W&B shows and compares them."""
        if self._run is not None:
            self._run.config.update({f"text/{k}": v for k, v in texts.items()}, allow_val_change=True)

    def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets=None):
        if self._run is not None:
            import wandb

            self._run.log({k: wandb.Histogram(v) for k, v in arrays.items()}, step=step)

    def write_hparams(self, hparams: Mapping[str, Any]):
        if self._run is not None:
            self._run.config.update(dict(hparams), allow_val_change=True)

    def flush(self):
        pass

    def close(self):
        if self._run is not None:
            self._run.finish()
            self._run = None
