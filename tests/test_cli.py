"""The command line end to end, in subprocesses, as a user runs it.

Covers the embedded default (tiny GLA on the CPU reference kernels: loss falls, config files written,
deterministic), resume, and the bad-config cases: each exits non-zero with a message naming the fault and
leaves no run directory behind.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ["--gin_file=gin/tiny.gin"]


def _train(*args, cwd=ROOT, timeout=300):
  env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
  return subprocess.run([sys.executable, "-m", "flame_gin.train", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _losses(output: str) -> dict[int, float]:
  return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"step (\d+)/\d+ \| loss ([\d.]+)", output)}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("tiny") / "run"
  result = _train(*TINY, f"--workdir={workdir}", "--gin.TRAIN_STEPS=40", "--gin.flame_gin.run.log_interval=5")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def test_tiny_default_trains_and_loss_falls(tiny_run):
  workdir, result = tiny_run
  losses = _losses(result.stderr)
  assert sorted(losses) == list(range(5, 41, 5)), result.stderr[-2000:]
  assert losses[40] < losses[5] - 0.5, losses


def test_config_files_written_and_reparseable(tiny_run):
  workdir, _ = tiny_run
  config = (workdir / "config.gin").read_text()
  operative = (workdir / "operative_config.gin").read_text()
  assert "TRAIN_STEPS = 40" in config
  assert "run.train_steps = %TRAIN_STEPS" in operative
  result = _train("--gin_file=" + str(workdir / "config.gin"), "--print_config")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "TRAIN_STEPS = 40" in result.stdout


def test_same_config_gives_identical_losses(tmp_path):
  args = [*TINY, "--gin.TRAIN_STEPS=6", "--gin.WARMUP_STEPS=2", "--gin.flame_gin.run.log_interval=1"]
  first, second = (_train(*args, f"--workdir={tmp_path / name}") for name in ("a", "b"))
  assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:]
  assert len(_losses(first.stderr)) == 6
  assert _losses(first.stderr) == _losses(second.stderr)


def test_print_config_builds_nothing(tmp_path):
  result = _train(*TINY, f"--workdir={tmp_path / 'w'}", "--print_config", "--gin.LR=0.123")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "LR = 0.123" in result.stdout
  assert not (tmp_path / "w").exists()


_BAD_CONFIGS = [
    (["--gin_bindings=flame_gin.run.sede = 1"], r"sede.*bindings string line 1"),
    (["--gin_bindings=flame_gin.nope.x = 1"], r"No configurable matching 'flame_gin.nope'"),
    (["--gin_file=gin/does_not_exist.gin"], r"does_not_exist.gin.*not found"),
    (["--gin_bindings=flame_gin.model_config.overrides = {'hidden_size': 32, 'num_head': 2}"],
     r"num_head.*did you mean 'num_heads'.*Valid keys"),
    (["--gin.BATCH_SIZE=3", "--gin.flame_gin.run.grad_accum_steps=2"], r"BATCH_SIZE=3"),
    (["--gin_file=gin/model/mamba2.gin", "--gin_file=gin/data/varlen.gin"], r"varlen.*'mamba2' would let documents"),
]


@pytest.fixture(scope="module")
def bad_config_runs(tmp_path_factory):
  """Every bad-config case started at once: each is its own process that fails early, after the imports that
  take most of its time, so they share the cores instead of queueing. Yields (workdir, returncode, stderr)."""
  base = tmp_path_factory.mktemp("bad")
  env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
  started = []
  for i, (args, _) in enumerate(_BAD_CONFIGS):
    workdir = base / f"w{i}"
    started.append((workdir, subprocess.Popen(
        [sys.executable, "-m", "flame_gin.train", *TINY, f"--workdir={workdir}", *args], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
  runs = []
  for workdir, proc in started:
    _, stderr = proc.communicate(timeout=600)
    runs.append((workdir, proc.returncode, stderr))
  return runs


@pytest.mark.parametrize("case", range(len(_BAD_CONFIGS)), ids=[m for _, m in _BAD_CONFIGS])
def test_bad_config_is_named_and_leaves_no_debris(bad_config_runs, case):
  workdir, returncode, stderr = bad_config_runs[case]
  assert returncode != 0
  assert re.search(_BAD_CONFIGS[case][1], stderr, re.DOTALL), stderr[-2000:]
  assert "Traceback" not in stderr
  assert not workdir.exists()


def test_missing_workdir_names_model_dir():
  result = _train(*TINY)
  assert result.returncode != 0
  assert "MODEL_DIR" in result.stderr


def test_gin_file_found_from_another_directory(tmp_path):
  result = _train(*TINY, f"--workdir={tmp_path / 'w'}", "--print_config", cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
