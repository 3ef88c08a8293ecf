"""Loss parity on the same tokens: flame_gin's trainer against a plain training loop, step by step.

Why: a researcher switching frameworks compares loss curves, and a curve that differs by a few percent could
be the framework (optimizer groups, schedule, loss normalisation, clipping, kernels) or the data order. Here
the data order is taken out: both sides read the batches of the same configured loader, start from the same
initial weights and use the same hyper-parameters; every other part of the reference is written out plainly
below (``AutoModelForCausalLM`` forward, ``F.cross_entropy``, ``torch.optim.AdamW`` with decay on matrices
only, ``clip_grad_norm_``, the warm-up + cosine formula), so the trainer's own modules are not checked against
themselves.

Tolerance: in float32 (CPU) the two must agree to rounding. In bf16 (GPU) they differ by kernel and precision
noise, so the reference runs twice, the second time with the loss taken on bf16 logits instead of float32
ones: the largest difference between those two equally valid loops is the noise floor, and the trainer must
stay within ``--noise_factor`` times it (plus 1e-3).

  python benchmarks/convergence.py --gin_file=gin/tiny.gin --steps=20
  python benchmarks/convergence.py --gin_file=gin/gla.gin --gin_file=gin/data/embedded.gin \
      --gin.BATCH_SIZE=16 --gin.SEQ_LEN=2048 --steps=300

The last line printed is one JSON object: both loss curves, the largest absolute difference, the noise floor
and whether the trainer is within tolerance.

One bf16 run pair cannot tell a bias from chaos: after a loss spike two equally valid loops part by as much as
the loss moves. ``--seeds=1,2,...`` runs the comparison once per seed and prints, last, the across-seed mean
(and its standard error) of the trainer's second-half offset from the float32-logit reference, beside the same
figure for the bf16-logit reference: a trainer without a bias is as far from the first reference as the second
reference is.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import tempfile

import torch
import torch.nn.functional as F
import transformers
from tensorboard.backend.event_processing import event_accumulator

import gin

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flame_gin import config as config_lib  # noqa: E402
from flame_gin import configurables, kernels, models  # noqa: E402

IGNORE = -100


def parse(*, gin_files: list[str], bindings: list[str], workdir: str) -> None:
    """The run's config, with one loss logged per step and nothing else written."""
    config_lib.parse(
        gin_files=gin_files,
        gin_bindings=[
            *bindings,
            f"MODEL_DIR = {workdir!r}",
            "flame_gin.run.log_interval = 1",
            "flame_gin.evaluation.interval = 0",
            "flame_gin.run.checkpointer = None",
            "flame_gin.run.grad_accum_steps = 1",
        ],
        search_paths=config_lib.default_search_paths(),
    )


def trainer_losses(*, workdir: str) -> list[float]:
    """Runs ``flame_gin.run`` as configured; its per-step losses, read back from its TensorBoard events."""
    status = configurables.run(config_text="", on_first_step=None)
    if status != 0:
        raise RuntimeError(f"flame_gin.run returned {status}")
    acc = event_accumulator.EventAccumulator(str(pathlib.Path(workdir) / "tensorboard"))
    acc.Reload()
    return [e.value for e in sorted(acc.Scalars("loss"), key=lambda e: e.step)]


def _cosine(step: int, *, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def reference_losses(*, steps: int, bf16_logits: bool = False, decay_all: bool = False) -> list[float]:
    """The plain loop over the batches of the configured loader; returns its per-step losses.

    ``decay_all`` decays every parameter (norms, biases, embeddings too), as flame does, to measure what that
    choice alone changes on the same tokens."""
    value = config_lib.bound_value
    if value("flame_gin.lr_schedule.name", "cosine") != "cosine":
        raise ValueError("the reference loop implements the cosine schedule only")
    seed, seq_len, batch = (
        value("flame_gin.run.seed", 42),
        value("flame_gin.run.seq_len"),
        value("flame_gin.run.batch_size"),
    )
    lr, weight_decay = value("flame_gin.adamw.lr"), value("flame_gin.adamw.weight_decay", 0.1)
    warmup, min_ratio = value("flame_gin.lr_schedule.warmup_steps", 0), value("flame_gin.lr_schedule.min_lr_ratio", 0.0)
    total, clip = value("flame_gin.run.train_steps"), value("flame_gin.run.max_grad_norm", 1.0)
    betas, eps = value("flame_gin.adamw.betas", (0.9, 0.95)), value("flame_gin.adamw.eps", 1e-8)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = gin.query_parameter("flame_gin.run.model_config").scoped_configurable_fn()
    loader = gin.query_parameter("flame_gin.run.train_data").scoped_configurable_fn(
        seq_len=seq_len, batch_size=batch, rank=0, world_size=1, seed=seed, split="train", varlen=False
    )
    kernels.select(mode="auto")
    torch.manual_seed(seed)
    model = models.build_model(config=config, device=device, seed=seed)  # the trainer's initial weights
    assert isinstance(model, transformers.PreTrainedModel)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay = [p for p in model.parameters() if decay_all or (p.ndim >= 2 and id(p) not in embeddings)]
    other = [p for p in model.parameters() if not decay_all and (p.ndim < 2 or id(p) in embeddings)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=lr,
        betas=tuple(betas),
        eps=eps,
    )
    losses, it = [], iter(loader)
    for step in range(steps):
        b = next(it)
        ids, labels = b["input_ids"].to(device), b["labels"].to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids).logits
        logits = logits if bf16_logits else logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
        for group in opt.param_groups:
            group["lr"] = _cosine(step, lr=lr, warmup=warmup, total=total, min_ratio=min_ratio)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def compare(*, gin_files: list[str], bindings: list[str], steps: int, noise_factor: float = 3.0) -> dict:
    """Both loops on the same config; the JSON record."""
    with tempfile.TemporaryDirectory(prefix="convergence_") as workdir:
        parse(gin_files=gin_files, bindings=[*bindings, f"TRAIN_STEPS = {steps}"], workdir=workdir)
        ours = trainer_losses(workdir=workdir)
        reference = reference_losses(steps=steps)
        on_gpu = torch.cuda.is_available()
        second = reference_losses(steps=steps, bf16_logits=True) if on_gpu else reference
    diff = max(abs(a - b) for a, b in zip(ours, reference))
    half = steps // 2
    bias = lambda xs: sum(x - r for x, r in zip(xs[half:], reference[half:])) / max(1, steps - half)  # noqa: E731
    noise = max(abs(a - b) for a, b in zip(second, reference))
    tolerance = noise_factor * noise + (1e-3 if on_gpu else 1e-4)
    return {
        "benchmark": "convergence",
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "steps": steps,
        "max_abs_diff": diff,
        "noise_floor": noise,
        "tolerance": tolerance,
        "within_tolerance": len(ours) == len(reference) == steps and diff <= tolerance,
        "mean_diff_second_half": {"flame_gin": bias(ours), "reference_bf16_logits": bias(second)},
        "mean_last_tenth": {
            "flame_gin": sum(ours[-max(1, steps // 10) :]) / max(1, steps // 10),
            "reference": sum(reference[-max(1, steps // 10) :]) / max(1, steps // 10),
        },
        "flame_gin": ours,
        "reference": reference,
    }


def summarise(records: list[dict]) -> dict:
    """Across seeds: mean and standard error of the second-half offsets, the trainer's and the second
    reference's, and their paired difference; ``no_bias`` when the trainer's mean offset is within two
    standard errors of zero."""

    def stats(xs: list[float]) -> dict:
        mean = sum(xs) / len(xs)
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / max(1, len(xs) - 1))
        return {"mean": mean, "sem": sd / math.sqrt(len(xs)), "sd": sd}

    ours = [r["mean_diff_second_half"]["flame_gin"] for r in records]
    second = [r["mean_diff_second_half"]["reference_bf16_logits"] for r in records]
    offset = stats(ours)
    return {
        "benchmark": "convergence_seeds",
        "device": records[0]["device"],
        "seeds": len(records),
        "steps": records[0]["steps"],
        "offset_second_half": {
            "flame_gin": offset,
            "reference_bf16_logits": stats(second),
            "paired_difference": stats([a - b for a, b in zip(ours, second)]),
        },
        "within_tolerance_per_seed": sum(r["within_tolerance"] for r in records),
        "no_bias": abs(offset["mean"]) <= 2 * offset["sem"] + 1e-3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--noise_factor", type=float, default=3.0)
    parser.add_argument("--seeds", default="", help="comma-separated seeds: one comparison each, then a summary")
    args, rest = parser.parse_known_args()
    bindings = [
        *args.gin_bindings,
        *(r[len("--gin.") :].replace("=", " = ", 1) for r in rest if r.startswith("--gin.")),
    ]
    gin_files = args.gin_file or ["gin/tiny.gin"]
    if not args.seeds:
        print(
            json.dumps(
                compare(gin_files=gin_files, bindings=bindings, steps=args.steps, noise_factor=args.noise_factor)
            )
        )
        return
    records = []
    for seed in (int(s) for s in args.seeds.split(",")):
        records.append(
            compare(
                gin_files=gin_files,
                bindings=[*bindings, f"SEED = {seed}"],
                steps=args.steps,
                noise_factor=args.noise_factor,
            )
        )
        print(json.dumps(records[-1]), flush=True)
    print(json.dumps(summarise(records)))


if __name__ == "__main__":
    main()
