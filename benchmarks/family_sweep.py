"""Every model family of the zoo trains on this machine: one short CLI run per family file of ``gin/model/``.

Why: a family in the zoo is a promise that it trains, and building a model proves only construction. Each
family file is run the way a user runs it (``python -m flame_gin.train``, the embedded corpus of
``gin/tiny.gin``) at one small shape (8 layers, hidden 512, 4 x 2048 tokens by default), in its own process,
several at once (most of a cold start is Triton compiling and autotuning FLA's kernels, on the CPU). All runs
share one Triton cache folder, so a second sweep on the same machine starts warm.

  python benchmarks/family_sweep.py --steps=30 --jobs=8 --out=sweep.jsonl

One JSON line per family (status, loss at the first and last step, steady tokens/s, peak GiB, first-step
seconds, the error's last line when it failed; with ``--export``, the last checkpoint exported, reloaded in
``transformers`` and generating, from ``export_reload.py``), then a summary JSON line last.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCALARS = re.compile(r"\] \[(\d+)\] (.*)$")
# Attention layer indices at the sweep's depth, in each family file's own pattern: Samba every second layer,
# the hybrids every fourth (the last layer at least).
LAYOUT = {
    "samba": lambda n: [i for i in range(n) if i % 2 == 1],
    "gla_hybrid": lambda n: [i for i in range(n) if i % 4 == 3] or [n - 1],
    "gated_deltanet_hybrid": lambda n: [i for i in range(n) if i % 4 == 3] or [n - 1],
}


def family_files() -> list[str]:
    """The family files (not the size files) under gin/model/."""
    return sorted(p.stem for p in (ROOT / "gin" / "model").glob("*.gin") if not re.search(r"_\d+[mb]$", p.stem))


def _command(*, family: str, workdir: str, args) -> list[str]:
    bindings = [
        f"HIDDEN_SIZE={args.hidden}",
        f"NUM_LAYERS={args.layers}",
        f"SEQ_LEN={args.seq_len}",
        f"BATCH_SIZE={args.batch}",
        f"TRAIN_STEPS={args.steps}",
        "LR=1e-3",
        f"WARMUP_STEPS={min(5, args.steps // 5)}",
    ]
    if family in LAYOUT:
        bindings.append(f"ATTN_LAYERS={LAYOUT[family](args.layers)}")
    return [
        sys.executable,
        "-m",
        "flame_gin.train",
        "--gin_file=gin/tiny.gin",
        f"--gin_file=gin/model/{family}.gin",
        *[f"--gin.{b}" for b in bindings],
        "--gin_bindings=flame_gin.evaluation.interval = 0",
        "--gin_bindings=flame_gin.run.log_interval = 1",
        *(
            [f"--gin.CHECKPOINT_INTERVAL={args.steps}", "--gin_bindings=flame_gin.checkpointer.async_save = False"]
            if args.export
            else ["--gin_bindings=flame_gin.run.checkpointer = None"]
        ),
        f"--workdir={workdir}",
    ]


def _parse(log: str) -> dict[int, dict[str, float]]:
    """step -> scalars, from the trainer's metric-writer log lines."""
    steps = {}
    for line in log.splitlines():
        match = SCALARS.search(line)
        if match and "loss=" in match.group(2):
            values = dict(kv.split("=", 1) for kv in match.group(2).split(", ") if "=" in kv)
            steps[int(match.group(1))] = {
                k: float(v) for k, v in values.items() if re.fullmatch(r"[-+\d.eE]+|nan|inf", v)
            }
    return steps


def _export_reload(*, workdir: str, env: dict, timeout: float, log: pathlib.Path | None) -> dict:
    """The run's last checkpoint exported, reloaded in transformers and generating (`export_reload.py`); its
    output kept in `log` when given."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "export_reload.py"), f"--checkpoint_dir={workdir}/checkpoints"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    text = proc.stdout + proc.stderr
    if log is not None:
        log.write_text(text)
    lines = [line for line in text.splitlines() if line.strip()]
    last_json = next((line for line in reversed(proc.stdout.splitlines()) if line.startswith("{")), None)
    if proc.returncode == 0 and last_json:
        return json.loads(last_json)
    return {"status": f"exit {proc.returncode}", "error": (lines[-1] if lines else "")[-400:]}


def run_family(*, family: str, args, env: dict) -> dict:
    """One family's run: its JSON record."""
    with tempfile.TemporaryDirectory(prefix=f"sweep_{family}_") as workdir:
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                _command(family=family, workdir=workdir, args=args),
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            log, code = proc.stderr + proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as e:
            log, code = (
                (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""),
                None,
            )
        export_log = pathlib.Path(args.log_dir, f"{family}.export.log") if args.log_dir else None
        exported = (
            _export_reload(workdir=workdir, env=env, timeout=args.timeout, log=export_log)
            if args.export and code == 0
            else None
        )
    if args.log_dir:
        pathlib.Path(args.log_dir, f"{family}.log").write_text(log)
    steps = _parse(log)
    record = {"family": family, "seconds": round(time.perf_counter() - start, 1), "steps_done": len(steps)}
    if exported is not None:
        record["export"] = exported
    if steps:
        first, last = steps[min(steps)], steps[max(steps)]
        steady = [steps[s] for s in sorted(steps) if s > min(5, args.steps - 1)] or [last]
        record.update(
            loss_first=first.get("loss"),
            loss_last=last.get("loss"),
            first_step_s=round(first.get("step_time", float("nan")), 2),
            tokens_per_second=round(sum(s["tokens_per_second"] for s in steady) / len(steady)),
            peak_gib=round(max(s.get("peak_memory_gib", 0.0) for s in steps.values()), 2),
        )
    if code == 0 and len(steps) == args.steps:
        falling = record["loss_last"] < record["loss_first"]
        record["status"] = "trained" if falling else "loss did not fall"
    else:
        record["status"] = "timeout" if code is None else f"exit {code}"
        lines = [line for line in log.splitlines() if line.strip()]
        record["error"] = next(
            (line for line in reversed(lines) if "Error" in line or "flame_gin:" in line), lines[-1] if lines else ""
        )[-400:]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="*", default=None, help="family files (default: all of gin/model/)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=540.0, help="seconds per family")
    parser.add_argument("--triton_cache", default=str(ROOT / ".triton_cache"))
    parser.add_argument("--out", default="", help="also append each JSON line to this file")
    parser.add_argument(
        "--export", action="store_true", help="checkpoint the last step, export it and reload it (export_reload.py)"
    )
    parser.add_argument("--log_dir", default="", help="also keep each family's full log here")
    args = parser.parse_args()
    if args.log_dir:
        pathlib.Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    families = args.families or family_files()
    env = dict(os.environ, TRITON_CACHE_DIR=args.triton_cache, PYTHONUNBUFFERED="1")
    records = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_family, family=f, args=args, env=env): f for f in families}
        for future in concurrent.futures.as_completed(futures):
            record = future.result()
            records.append(record)
            line = json.dumps(record)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
    trained = sorted(r["family"] for r in records if r["status"] == "trained")
    print(
        json.dumps(
            {
                "benchmark": "family_sweep",
                "families": len(records),
                "trained": len(trained),
                "failed": sorted(r["family"] for r in records if r["status"] != "trained"),
                "shape": f"{args.layers} layers, hidden {args.hidden}, {args.batch} x {args.seq_len}",
                "steps": args.steps,
                **(
                    {"export_ok": sorted(r["family"] for r in records if r.get("export", {}).get("status") == "ok")}
                    if args.export
                    else {}
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
