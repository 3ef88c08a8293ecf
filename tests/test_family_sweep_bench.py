"""benchmarks/family_sweep.py --export on a CPU: a family trains through the CLI, and its last checkpoint exports,
reloads in transformers with the same logits and generates as full forwards would (export_reload.py)."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # two CLI processes


def test_gla_trains_exports_reloads_and_generates(tmp_path):
    out = tmp_path / "sweep.jsonl"
    cmd = [sys.executable, "benchmarks/family_sweep.py", "--families", "gla", "--steps", "3", "--hidden", "32"]
    cmd += ["--layers", "1", "--seq_len", "64", "--batch", "2", "--jobs", "1", "--timeout", "300", "--export"]
    logs = tmp_path / "logs" / "new"  # created by the sweep
    cmd += [f"--out={out}", f"--log_dir={logs}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert "step 3/3" in (logs / "gla.log").read_text()
    assert record["status"] == "trained" and record["steps_done"] == 3, record
    export = record["export"]
    assert export["step"] == 3 and export["family"] == "gla" and export["device"] == "cpu", export
    assert export["logits_max_abs_diff"] == 0.0 and export["cached_matches_full"] is True, export
    assert len(export["generated"]) == 8 and export["status"] == "ok", export
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["benchmark"] == "family_sweep" and summary["export_ok"] == ["gla"], summary
