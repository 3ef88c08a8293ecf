"""launch/local.sh: torchrun (c10d rendezvous) with one process on this CPU runs three steps to completion."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocess / multi-process runs: the full suite only

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_local_sh_one_process_three_steps(tmp_path):
    env = dict(os.environ, NPROC="1", FLAME_GIN_PYTHON=sys.executable, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [
            str(REPO / "launch" / "local.sh"),
            "--gin_file=gin/tiny.gin",
            f"--workdir={tmp_path / 'run'}",
            "--gin.TRAIN_STEPS=3",
            "--gin.WARMUP_STEPS=1",
            "--gin.BATCH_SIZE=2",
            "--gin.SEQ_LEN=32",
            "--gin_bindings=flame_gin.run.log_interval=1",
            "--gin_bindings=flame_gin.evaluation.interval=0",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert [int(s) for s in re.findall(r"step (\d+)/3\b", output)] == [1, 2, 3], output[-4000:]
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir()


def test_local_sh_rejects_bad_nproc(tmp_path):
    proc = subprocess.run(
        [str(REPO / "launch" / "local.sh"), f"--workdir={tmp_path}"],
        env=dict(os.environ, NPROC="two"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "NPROC must be a positive integer, got 'two'" in proc.stderr
