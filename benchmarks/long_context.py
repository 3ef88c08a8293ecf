"""Tokens/s and peak memory against context length, at the same tokens per step: linear attention's promise.

Why: a linear-attention layer costs the same per token at any context length, softmax attention's cost per
token grows with it. The claim is only worth what a measured curve shows: each series (a gin file, varlen or
not) is trained at every context length ``L`` with ``tokens // L`` sequences a step, so every row does the same
number of tokens and the same matrix products outside attention. Varlen rows pack documents of random length
in [L/8, L] (documents as long as the context, cut at it) into one row with ``cu_seqlens``; the others are
``tokens // L`` rows of ``L`` tokens, one document each, as the softmax baseline sees them.

Each row is one process of ``benchmarks/throughput.py`` (flame_gin's trainer on synthetic tokens, no hand loop:
the hand loop has no activation checkpointing and would not fit 64K tokens), so each peak is that run's own.
Full activation checkpointing of every block (``--ac``, on by default) keeps the same setting at every length.

  python benchmarks/long_context.py --series gla:gin/gla.gin:varlen --series llama:gin/llama.gin \
      --lengths 2048 8192 32768 65536 --tokens 65536 --steps 12 --warmup 4 --out long.jsonl

One JSON line per row, then a summary line last: for each series tokens/s at every length and the ratio of
the longest to the shortest (the goal for linear attention: within 15% of 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
AC = [
    "flame_gin.run.parallel_dims = @flame_gin.ParallelDims",
    "flame_gin.run.parallelize = @flame_gin.parallelize",
    "flame_gin.parallelize.activation_checkpointing = 'full'",
    "flame_gin.parallelize.ac_every = 1",
]


def parse_series(text: str) -> dict:
    """``name:gin_file[+gin_file...][:varlen]`` -> the series' name, gin files and whether it packs varlen."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "varlen") or not parts[0] or not parts[1]:
        raise argparse.ArgumentTypeError(f"--series {text!r}: expected NAME:GIN_FILE[+GIN_FILE...][:varlen]")
    return {"name": parts[0], "gin_files": parts[1].split("+"), "varlen": len(parts) == 3}


def row_command(*, series: dict, length: int, tokens: int, args) -> list[str]:
    """The throughput.py command for one series at one context length."""
    if tokens % length:
        raise ValueError(f"--tokens {tokens} is not a multiple of the context length {length}")
    bindings = [f"SEQ_LEN = {length}", f"BATCH_SIZE = {tokens // length}", *args.gin_bindings]
    if series["varlen"]:
        bindings.append("flame_gin.run.varlen = True")
    if args.ac:
        bindings.extend(AC)
    return [
        sys.executable,
        str(ROOT / "benchmarks" / "throughput.py"),
        *[f"--gin_file={f}" for f in series["gin_files"]],
        *[f"--gin_bindings={b}" for b in bindings],
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        "--baseline=False",
        "--measure_peak=False",
        f"--label={series['name']}@{length}",
    ]


def run_row(*, series: dict, length: int, args) -> dict:
    """One row in its own process; its JSON line, or a failure with the error's last lines."""
    cmd = row_command(series=series, length=length, tokens=args.tokens, args=args)
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    row = {"series": series["name"], "length": length, "tokens_per_step": args.tokens, "varlen": series["varlen"]}
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {
            **row,
            "status": "failed",
            "rc": proc.returncode,
            "error": " | ".join(tail),
            "wall_s": time.time() - start,
        }
    line = json.loads(lines[-1])
    return {
        **row,
        "status": "ok",
        "tokens_per_second": line["tokens_per_second"],
        "peak_memory_gib": line["peak_memory_gib"],
        "time_to_first_step_s": line["time_to_first_step_s"],
        "flops_per_token": line["flops_per_token"],
        "mfu_vendor": line["mfu_vendor"],
        "final_loss": line["flame_gin"].get("final_loss"),
        "device": line["device"],
        "wall_s": round(time.time() - start, 1),
    }


def summarise(rows: list[dict]) -> dict:
    """Per series: tokens/s by length, and the longest length's rate over the shortest's."""
    out = {}
    for name in dict.fromkeys(r["series"] for r in rows):
        ok = sorted((r for r in rows if r["series"] == name and r["status"] == "ok"), key=lambda r: r["length"])
        rates = {r["length"]: r["tokens_per_second"] for r in ok}
        entry = {"tokens_per_second": rates, "peak_gib": {r["length"]: r["peak_memory_gib"] for r in ok}}
        if len(ok) >= 2:
            entry["longest_over_shortest"] = round(ok[-1]["tokens_per_second"] / ok[0]["tokens_per_second"], 3)
        entry["failed"] = [r["length"] for r in rows if r["series"] == name and r["status"] != "ok"]
        out[name] = entry
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--series", type=parse_series, action="append", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768, 65536])
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per step, the same at every length")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--ac", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--gin_bindings", action="append", default=[], help="applied to every row")
    parser.add_argument("--timeout", type=float, default=560.0, help="seconds per row")
    parser.add_argument("--out", default="", help="also append each JSON line to this file")
    args = parser.parse_args(argv)
    rows = []
    for series in args.series:
        for length in args.lengths:
            try:
                row = run_row(series=series, length=length, args=args)
            except subprocess.TimeoutExpired:
                row = {"series": series["name"], "length": length, "status": "timeout", "timeout_s": args.timeout}
            rows.append(row)
            _emit(row, args.out)
    _emit(
        {"summary": summarise(rows), "lengths": args.lengths, "tokens_per_step": args.tokens, "ac": args.ac}, args.out
    )
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _emit(line: dict, path: str) -> None:
    text = json.dumps(line)
    print(text, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    sys.exit(main())
