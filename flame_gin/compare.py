"""Compare runs: one PNG of their curves against tokens seen, and a short table.

  python -m flame_gin.compare runs/gla runs/gla_short_conv --out=compare.png

An ablation is read by putting runs side by side: training loss, held-out loss and tokens/s, each against the
tokens seen (runs with other batch sizes line up), read from each run directory's TensorBoard event files with
TensorBoard's own reader. The table gives each run's final loss (mean of its last 10 logged values, so one noisy
step does not decide), best held-out loss, mean tokens/s after the first logged step and mean MFU.
"""

from __future__ import annotations

import math
import pathlib
import sys

from absl import app, flags

_OUT = flags.DEFINE_string("out", "compare.png", "PNG to write.")
_LAST = 10  # logged values averaged into "final loss"
PANELS = (("loss", "training loss"), ("eval_loss", "held-out loss"), ("tokens_per_second", "tokens/s"))


def read_run(run_dir: str | pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of the scalars in ``run_dir/tensorboard`` (every event file, later steps win)."""
    from tensorboard.backend.event_processing import event_accumulator

    folder = pathlib.Path(run_dir) / "tensorboard"
    if not folder.is_dir():
        raise FileNotFoundError(f"{run_dir}: no tensorboard/ folder; is it a flame_gin run directory?")
    scalars: dict[str, dict[int, float]] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        acc = event_accumulator.EventAccumulator(str(events), size_guidance={event_accumulator.SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                scalars.setdefault(tag, {})[event.step] = event.value
    if "loss" not in scalars:
        raise ValueError(f"{run_dir}: its event files hold no training loss")
    return {tag: sorted(values.items()) for tag, values in scalars.items()}


def _tokens_at(run: dict, step: int) -> float:
    """Tokens seen by ``step`` (interpolated between logged steps; by the step itself when none is logged)."""
    seen = run.get("tokens_seen")
    if not seen:
        return float(step)
    before = [(s, v) for s, v in seen if s <= step] or [(0, 0.0)]
    after = [(s, v) for s, v in seen if s >= step] or [seen[-1]]
    (s0, v0), (s1, v1) = before[-1], after[0]
    return v0 if s1 == s0 else v0 + (v1 - v0) * (step - s0) / (s1 - s0)


def summary(run: dict) -> dict[str, float]:
    """The table row of one run."""

    def mean(values):
        return sum(values) / len(values) if values else math.nan

    losses = [v for _, v in run["loss"]]
    speeds = [v for _, v in run.get("tokens_per_second", [])][1:]  # the first window holds compilation
    return {
        "final_loss": mean(losses[-_LAST:]),
        "best_eval_loss": min((v for _, v in run.get("eval_loss", [])), default=math.nan),
        "tokens_per_second": mean(speeds),
        "mfu": mean([v for _, v in run.get("mfu", [])][1:]),
        "steps": run["loss"][-1][0],
    }


def plot(*, runs: dict[str, dict], out: str | pathlib.Path) -> pathlib.Path:
    """One PNG with a panel per curve of ``PANELS``, every run in each, against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(6 * len(PANELS), 4.2))
    for ax, (tag, title) in zip(axes, PANELS):
        for name, run in runs.items():
            points = run.get(tag, [])
            if points:
                ax.plot(
                    [_tokens_at(run, s) for s, _ in points],
                    [v for _, v in points],
                    label=name,
                    marker="o" if len(points) < 20 else None,
                )
        ax.set_title(title)
        ax.set_xlabel("tokens seen")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    out = pathlib.Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def table(rows: dict[str, dict[str, float]]) -> str:
    """Plain-text table: one line per run."""
    width = max(len("run"), *(len(n) for n in rows))
    lines = [f"{'run':<{width}}  {'steps':>7}  {'final loss':>10}  {'best eval':>10}  {'tokens/s':>11}  {'MFU':>6}"]
    for name, r in rows.items():
        mfu = "" if math.isnan(r["mfu"]) else f"{100 * r['mfu']:.1f}%"
        lines.append(
            f"{name:<{width}}  {r['steps']:>7}  {r['final_loss']:>10.4f}  {r['best_eval_loss']:>10.4f}  "
            f"{r['tokens_per_second']:>11,.0f}  {mfu:>6}"
        )
    return "\n".join(lines)


def main(argv) -> int:
    if len(argv) < 2:
        raise app.UsageError("give one or more run directories")
    try:
        runs = {d: read_run(d) for d in argv[1:]}
    except (FileNotFoundError, ValueError) as e:
        print(f"flame_gin.compare: {e}", file=sys.stderr)
        return 2
    out = plot(runs=runs, out=_OUT.value)
    print(table({name: summary(run) for name, run in runs.items()}))
    print(f"wrote {out}")
    return 0


def run_main() -> None:
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run_main()
