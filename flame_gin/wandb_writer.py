"""A Weights & Biases metric writer with CLU's writer interface (optional extra: ``pip install .[wandb]``)."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from flame_gin.metrics import MetricWriter


class WandbWriter(MetricWriter):
  """Sends scalars, texts and hparams to a W&B run; imported lazily so the extra stays optional."""

  def __init__(self, *, project: str, name: Optional[str] = None, directory: Optional[str] = None,
               mode: Optional[str] = None):
    try:
      import wandb
    except ImportError as e:
      raise ImportError("WandbWriter needs the 'wandb' package: pip install 'flame_gin[wandb]'") from e
    self._run = wandb.init(project=project, name=name, dir=directory, mode=mode)

  def write_summaries(self, step: int, values: Mapping[str, Any], metadata=None):
    self._run.log(dict(values), step=step)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    self._run.log({k: float(v) for k, v in scalars.items()}, step=step)

  def write_images(self, step: int, images: Mapping[str, Any]):
    import wandb
    self._run.log({k: wandb.Image(v) for k, v in images.items()}, step=step)

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    pass

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
    pass

  def write_texts(self, step: int, texts: Mapping[str, str]):
    self._run.log(dict(texts), step=step)

  def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets=None):
    import wandb
    self._run.log({k: wandb.Histogram(v) for k, v in arrays.items()}, step=step)

  def write_hparams(self, hparams: Mapping[str, Any]):
    self._run.config.update(dict(hparams), allow_val_change=True)

  def flush(self):
    pass

  def close(self):
    self._run.finish()
