"""The one module that registers flame_gin's injectable parts with gin.

Library modules stay gin-free (plain keyword-only functions, testable without a config); this module names
them for gin files. Importing it registers everything, which must happen before any config is parsed: gin
refuses new configurables once a config is finalised.
"""

from __future__ import annotations

import gin
from flame_gin import (
    checkpoint,
    data,
    downstream,
    loop,
    mesh,
    metrics,
    models,
    optim,
    parallel,
    profiling,
    schedules,
    start,
    trainer,
    wandb_writer,
)
from flame_gin.parallel import pipeline

_MODULE = "flame_gin"


def _register(fn, name: str, **kwargs):
    return gin.external_configurable(fn, name=name, module=_MODULE, **kwargs)


run = _register(trainer.run, "run", denylist=["config_text", "on_first_step", "stop_requested"])
_register(models.build_config, "model_config")
_register(schedules.make_schedule, "lr_schedule", denylist=["total_steps"])
_register(optim.AdamW, "adamw")
_register(loop.Evaluation, "evaluation")
_register(downstream.Downstream, "downstream", denylist=["output_dir"])
_register(start.Start, "start")
_register(metrics.create_writers, "metric_writers", denylist=["workdir", "is_primary"])
_register(profiling.Profiler, "profiler", denylist=["workdir", "rank"])
_register(wandb_writer.WandbWriter, "wandb_writer")
_register(
    data.build_loader,
    "build_loader",
    denylist=["seq_len", "batch_size", "rank", "world_size", "seed", "split", "varlen"],
)
_register(data.source, "data_source")
_register(data.embedded.tokenizer_path, "embedded_tokenizer")
_register(data.embedded.corpus_dir, "embedded_corpus")
_register(checkpoint.CheckpointSettings, "checkpointer")
_register(mesh.ParallelDims, "ParallelDims", denylist=["world_size"])
_register(parallel.parallelize, "parallelize", denylist=["model", "dims", "mesh"])
_register(pipeline.build_pipeline, "build_pipeline", denylist=["model", "pp_mesh", "parallelize_stage", "device"])
