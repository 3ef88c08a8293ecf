"""Downstream evaluation of a flame_gin checkpoint (or its Hugging Face export) with lm-evaluation-harness.

    python -m flame_gin.eval --checkpoint_dir=runs/x/checkpoints --tokenizer=fla-hub/gla-1.3B-100B \
        --tasks=lambada_openai,hellaswag --batch_size=16
    python -m flame_gin.eval --hf_dir=runs/x/hf --tasks=wikitext --include_path=my_tasks/

Why a command of our own rather than the stock ``lm_eval --model hf``: FLA's model types (``gla``,
``delta_net``, ...) are known to transformers only after ``import fla``, and on a machine without a GPU FLA's
Triton kernels cannot run; this command imports FLA, selects the kernels (Triton on a GPU, flame_gin's
reference kernels on a CPU) before the model is built, and hands the built model to lm-evaluation-harness's
own ``HFLM`` (``downstream.evaluate``), so the harness does all of the task work. Results go to a JSON file
(default: ``<run>/eval/step_<N>.json`` beside the checkpoints) and, for a checkpoint, to the run's metric
writers at the checkpoint's step (``downstream/<task>/<metric>``), next to its training curves in TensorBoard.
Needs the ``eval`` extra: ``pip install -e '.[eval]'``.
"""

from __future__ import annotations

import json
import pathlib

import torch
from absl import app, flags, logging

from flame_gin import kernels, metrics
from flame_gin.checkpoint import hf
from flame_gin.downstream import evaluate, scalars

_CHECKPOINT_DIR = flags.DEFINE_string("checkpoint_dir", None, "A run's checkpoint root (one folder per step).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest committed).")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "A Hugging Face export to evaluate instead of a checkpoint.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer",
    None,
    "Tokenizer name or folder ('embedded': the embedded default's); default for --hf_dir: the export's own.",
)
_TASKS = flags.DEFINE_list("tasks", None, "lm-evaluation-harness task names.", required=True)
_INCLUDE_PATH = flags.DEFINE_string("include_path", None, "A folder of task YAML files of your own.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Sequences per forward.")
_LIMIT = flags.DEFINE_integer("limit", None, "At most this many documents per task (for a quick look).")
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "Few-shot examples (default: each task's own).")
_OUTPUT = flags.DEFINE_string(
    "output",
    None,
    "JSON file for the results (default: <run>/eval/step_<N>.json for a checkpoint, <hf_dir>/eval.json for an export).",
)
_WRITE_METRICS = flags.DEFINE_bool(
    "write_metrics", True, "Also write the scores to the run's metric writers (checkpoints only)."
)


def load_model(
    *, checkpoint_dir: str | None, step: int | None, hf_dir: str | None, device: torch.device
) -> tuple[torch.nn.Module, int | None]:
    """The model in eval mode on ``device`` (and the checkpoint step, None for an export), with the kernels of
    ``device`` selected before it is built."""
    if (checkpoint_dir is None) == (hf_dir is None):
        raise ValueError("give exactly one of --checkpoint_dir and --hf_dir")
    kernels.select(mode="auto")
    if checkpoint_dir is not None:
        model, step = hf.load_checkpoint_model(checkpoint_dir=checkpoint_dir, step=step)
    else:
        import fla  # noqa: F401  (registers FLA's model types with transformers)
        from transformers import AutoModelForCausalLM

        model, step = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).eval(), step


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from flame_gin import quiet

    quiet.install()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from flame_gin.data import embedded

    tokenizer = embedded.resolve_tokenizer(_TOKENIZER.value) or _HF_DIR.value
    if tokenizer is None:
        raise app.UsageError("--tokenizer is required with --checkpoint_dir")
    try:
        model, step = load_model(
            checkpoint_dir=_CHECKPOINT_DIR.value, step=_STEP.value, hf_dir=_HF_DIR.value, device=device
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    results = evaluate(
        model=model,
        tokenizer=tokenizer,
        tasks=_TASKS.value,
        batch_size=_BATCH_SIZE.value,
        include_path=_INCLUDE_PATH.value,
        limit=_LIMIT.value,
        num_fewshot=_NUM_FEWSHOT.value,
        device=device,
    )
    run_dir = pathlib.Path(_CHECKPOINT_DIR.value).parent if _CHECKPOINT_DIR.value else None
    output = pathlib.Path(
        _OUTPUT.value
        or (run_dir / "eval" / f"step_{step}.json" if run_dir else pathlib.Path(_HF_DIR.value) / "eval.json")
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"step": step, "tasks": _TASKS.value, "results": results}, indent=2, default=str))
    if run_dir is not None and _WRITE_METRICS.value:
        writer = metrics.create_writers(workdir=run_dir, is_primary=True)
        writer.write_scalars(step, scalars(results))
        writer.close()
    logging.info("results written to %s", output)
    print(json.dumps({"step": step, **scalars(results)}))


def run_main():
    app.run(main)


if __name__ == "__main__":
    run_main()
