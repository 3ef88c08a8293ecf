"""launch/xm_launch.py: a two-point learning-rate sweep of the tiny config through XManager's local executor.

XManager lives in its own virtual environment (it pulls hundreds of MB of cloud clients); point
FLAME_GIN_XM_PYTHON at that environment's interpreter. Without it the sweep test skips, saying why.
The grid expansion is checked here too, without XManager.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))
import xm_launch  # noqa: E402


def test_sweep_points_grid_and_splitting():
    points = xm_launch.sweep_points(axes=["LR=1e-3,3e-3", "betas=(0.9, 0.95),(0.9, 0.99)"], common=["SEED = 1"])
    assert points == [
        ["SEED = 1", "LR = 1e-3", "betas = (0.9, 0.95)"],
        ["SEED = 1", "LR = 1e-3", "betas = (0.9, 0.99)"],
        ["SEED = 1", "LR = 3e-3", "betas = (0.9, 0.95)"],
        ["SEED = 1", "LR = 3e-3", "betas = (0.9, 0.99)"],
    ]
    assert xm_launch.sweep_points(axes=[], common=[]) == [[]]
    with pytest.raises(ValueError, match="LR"):
        xm_launch.sweep_points(axes=["LR"], common=[])
    with pytest.raises(ValueError, match="unbalanced"):
        xm_launch.split_values("(1, 2")


def _xm_python() -> str:
    python = os.environ.get("FLAME_GIN_XM_PYTHON")
    reason = None
    if not python:
        reason = "FLAME_GIN_XM_PYTHON is unset (an interpreter with `pip install xmanager`)"
    elif subprocess.run([python, "-c", "import xmanager.xm_local"], capture_output=True).returncode != 0:
        reason = f"FLAME_GIN_XM_PYTHON={python} cannot import xmanager.xm_local"
    if reason:
        print(f"SKIP test_launch_xm: {reason}", file=sys.stderr)
        pytest.skip(reason)
    return python


def test_local_sweep_two_learning_rates(tmp_path):
    python = _xm_python()
    root = tmp_path / "runs"
    env = dict(
        os.environ,
        HOME=str(tmp_path / "home"),
        OMP_NUM_THREADS="1",  # XManager keeps its state in ~/.xmanager
        FLAME_GIN_CACHE=os.environ.get("FLAME_GIN_CACHE", str(pathlib.Path.home() / ".cache" / "flame_gin")),
    )
    proc = subprocess.run(
        [
            python,
            str(REPO / "launch" / "xm_launch.py"),
            "--gin_file=gin/tiny.gin",
            "--sweep=LR=0.001,0.002",
            "--gin_bindings=TRAIN_STEPS = 3",
            "--gin_bindings=WARMUP_STEPS = 1",
            "--gin_bindings=BATCH_SIZE = 2",
            "--gin_bindings=SEQ_LEN = 32",
            "--gin_bindings=flame_gin.evaluation.interval = 0",
            f"--workdir_root={root}",
            f"--python={sys.executable}",
            "--nproc=1",
            "--title=test sweep",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    xid = re.search(r"experiment (\d+):", output)
    assert xid, output[-4000:]
    workdirs = sorted((root / xid.group(1)).iterdir())
    assert [w.name for w in workdirs] == ["1", "2"], output[-4000:]
    for workdir, lr in zip(workdirs, (0.001, 0.002)):
        assert f"LR = {lr}" in (workdir / "bindings.gin").read_text()
        recorded = re.search(r"^LR = (\S+)$", (workdir / "config.gin").read_text(), re.M)
        assert recorded and float(recorded.group(1)) == lr, (workdir / "config.gin").read_text()
        # Ran to completion: the final checkpoint is step 3.
        assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["3"], output[-4000:]
