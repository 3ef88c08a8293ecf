"""Downstream tasks with lm-evaluation-harness: on any built model, and periodically during training.

``evaluate`` hands an already built model to the harness's own ``HFLM`` (the harness does all of the task
work); ``scalars`` turns its results into ``downstream/<task>/<metric>`` values for the metric writers. Both
serve the ``python -m flame_gin.eval`` command (a checkpoint or an export) and ``Downstream``, the training
run's periodic evaluation (gin: ``flame_gin.downstream``; the run takes ``@flame_gin.downstream()``): every
``interval`` steps and at the last step, the tasks on the model being trained, results written to
``<workdir>/eval/step_<N>.json`` (as the command writes them) and to the run's metric writers.

The periodic evaluation runs on one process: on a mesh the model is sharded or split and the harness wants a
whole model, so there it is refused before anything is built; evaluate the checkpoints with the command instead.
Needs the ``eval`` extra: ``pip install -e '.[eval]'``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import pathlib

import torch

from flame_gin import checks


def evaluate(
    *,
    model: torch.nn.Module,
    tokenizer: str,
    tasks: list[str],
    batch_size: int = 8,
    include_path: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    device: torch.device,
) -> dict:
    """lm-evaluation-harness's ``simple_evaluate`` on an already built model; its results, ``task -> metrics``."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    lm = HFLM(
        pretrained=model, tokenizer=AutoTokenizer.from_pretrained(tokenizer), batch_size=batch_size, device=str(device)
    )
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=TaskManager(include_path=include_path),
        log_samples=False,
    )
    return out["results"]


def scalars(results: dict) -> dict[str, float]:
    """``downstream/<task>/<metric>`` -> value, for the numeric scores (the harness's ``metric,filter`` keys)."""
    out = {}
    for task, values in results.items():
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "alias":
                out[f"downstream/{task}/{key.split(',')[0]}"] = float(value)
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Downstream:
    """Downstream tasks every ``interval`` steps and at the last (0: never) on the model being trained.

    ``tasks``: harness task names (``include_path``: a folder of task YAML files of your own); ``tokenizer``:
    the run's tokenizer (a folder or hub name, or ``"embedded"``); ``limit``: at most this many documents per
    task, which keeps an evaluation inside a training run short. ``output_dir`` is the run's, set by the run.
    """

    tasks: tuple | list
    tokenizer: str
    interval: int = 1000
    batch_size: int = 8
    limit: int | None = None
    include_path: str | None = None
    num_fewshot: int | None = None
    output_dir: str | None = None

    def validate(self, *, world_size: int) -> None:
        """Raises ``ValueError`` naming the setting at fault (the plan phase reports it as a config error)."""
        checks.whole_number(
            self.interval, name="flame_gin.downstream.interval", minimum=0, what="a whole number of steps"
        )
        if not self.tasks:
            raise ValueError("flame_gin.downstream.tasks is empty: name at least one lm-evaluation-harness task")
        if self.include_path is not None and not pathlib.Path(self.include_path).is_dir():
            raise ValueError(f"flame_gin.downstream.include_path={self.include_path!r} is not a folder")
        if world_size > 1:
            raise ValueError(
                f"flame_gin.downstream runs on one process, this run has {world_size}: evaluate its checkpoints "
                "with `python -m flame_gin.eval --checkpoint_dir=...` instead"
            )
        if importlib.util.find_spec("lm_eval") is None:
            raise ValueError("flame_gin.downstream needs lm-evaluation-harness: pip install -e '.[eval]'")

    def due(self, *, step: int, last_step: int) -> bool:
        return self.interval > 0 and (step % self.interval == 0 or step == last_step)

    def run(self, *, model: torch.nn.Module, step: int, device: torch.device) -> dict[str, float]:
        """The tasks on ``model`` (in eval mode, then back to training mode); writes the step's JSON file and
        returns the scalars to log."""
        from flame_gin.data import embedded

        was_training = model.training
        model.eval()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
        try:
            with torch.no_grad(), autocast:
                results = evaluate(
                    model=model,
                    tokenizer=embedded.resolve_tokenizer(self.tokenizer),
                    tasks=list(self.tasks),
                    batch_size=self.batch_size,
                    include_path=self.include_path,
                    limit=self.limit,
                    num_fewshot=self.num_fewshot,
                    device=device,
                )
        finally:
            model.train(was_training)
        if self.output_dir is not None:
            out = pathlib.Path(self.output_dir) / f"step_{step}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"step": step, "tasks": list(self.tasks), "results": results}, default=str))
        return scalars(results)


def for_run(downstream: Downstream | None, *, workdir: str) -> Downstream | None:
    """The run's downstream settings with its output folder (``<workdir>/eval``); None when off."""
    if downstream is None or not downstream.interval:
        return None
    return dataclasses.replace(downstream, output_dir=str(pathlib.Path(workdir) / "eval"))
