"""benchmarks/long_context.py: every row does the same tokens per step, and a tiny CPU sweep gives sound lines."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import long_context  # noqa: E402

TINY = ["NUM_LAYERS=1", "HIDDEN_SIZE=32", "NUM_HEADS=2", "VOCAB_SIZE=256"]


def _args(**kw):
    return long_context.argparse.Namespace(
        **{"gin_bindings": [], "ac": True, "steps": 3, "warmup": 1, "tokens": 128, **kw}
    )


def test_every_length_trains_the_same_tokens_per_step():
    series = long_context.parse_series("gla:gin/gla.gin+gin/ablations/short_conv.gin:varlen")
    assert series == {"name": "gla", "gin_files": ["gin/gla.gin", "gin/ablations/short_conv.gin"], "varlen": True}
    for length in (16, 32, 128):
        cmd = long_context.row_command(series=series, length=length, tokens=128, args=_args())
        bindings = [c.split("=", 1)[1] for c in cmd if c.startswith("--gin_bindings=")]
        seq = int(next(b for b in bindings if b.startswith("SEQ_LEN")).split("=")[1])
        batch = int(next(b for b in bindings if b.startswith("BATCH_SIZE")).split("=")[1])
        assert seq == length and seq * batch == 128
        assert "flame_gin.run.varlen = True" in bindings and set(long_context.AC) <= set(bindings)
    with pytest.raises(ValueError, match="not a multiple"):
        long_context.row_command(series=series, length=48, tokens=128, args=_args())
    plain = long_context.row_command(
        series=long_context.parse_series("l:gin/llama.gin"), length=16, tokens=128, args=_args(ac=False)
    )
    assert not any("varlen" in c or "activation_checkpointing" in c for c in plain)
    for bad in ("gla", "gla:gin/gla.gin:packed", ":gin/gla.gin"):
        with pytest.raises(long_context.argparse.ArgumentTypeError, match="NAME:GIN_FILE"):
            long_context.parse_series(bad)


def test_summary_ratio_is_longest_over_shortest():
    rows = [
        {"series": "a", "length": 64, "status": "ok", "tokens_per_second": 90, "peak_memory_gib": 2.0},
        {"series": "a", "length": 16, "status": "ok", "tokens_per_second": 100, "peak_memory_gib": 1.0},
        {"series": "b", "length": 16, "status": "ok", "tokens_per_second": 50, "peak_memory_gib": 1.0},
        {"series": "b", "length": 64, "status": "failed"},
    ]
    summary = long_context.summarise(rows)
    assert summary["a"]["longest_over_shortest"] == 0.9 and summary["a"]["failed"] == []
    assert "longest_over_shortest" not in summary["b"] and summary["b"]["failed"] == [64]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_tiny_sweep_on_cpu(tmp_path):
    out = tmp_path / "rows.jsonl"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "long_context.py"),
        "--series",
        "gla:gin/gla.gin:varlen",
        "--lengths",
        "16",
        "64",
        "--tokens",
        "128",
        "--steps",
        "3",
        "--warmup",
        "1",
        f"--out={out}",
        *[f"--gin_bindings={b}" for b in TINY],
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=230, env={**os.environ, "JAX_PLATFORMS": "cpu"}
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["length"], r["status"]) for r in lines[:2]] == [(16, "ok"), (64, "ok")]
    assert all(r["tokens_per_second"] > 0 and 4.0 < r["final_loss"] < 6.5 for r in lines[:2])
    summary = lines[-1]["summary"]["gla"]
    assert summary["longest_over_shortest"] == round(lines[1]["tokens_per_second"] / lines[0]["tokens_per_second"], 3)
    assert lines[-1] == json.loads(proc.stdout.strip().splitlines()[-1])
