"""The trainer under torchrun (2 gloo CPU processes, real command line, gin/parallel/ files, real data and
checkpoints).

References: tensor and context parallel read one data stream, so they must match the single-process run step
by step (context parallel also in varlen mode, against a single-process varlen run); FSDP reads two streams
(the loader splits documents by stream, so its global batch is not the single process's), so it must match
the same two streams trained with replicated parameters (DDP semantics: all-reduced gradients, no sharding).
The FSDP run directory then resumes in a single process. The learning rate is constant (no warm-up, cosine
floor 1.0), so shorter runs are prefixes of longer ones. Each run is made once per module and shared.
"""

import functools
import os
import pathlib
import re
import subprocess
import sys

import pytest

from flame_gin import config as config_lib, models, trainer
from flame_gin.mesh import ParallelDims

ROOT = pathlib.Path(__file__).resolve().parent.parent
REF_STEPS, PAR_STEPS = 4, 3
COMMON = ["--gin_file=gin/tiny.gin", "--gin.WARMUP_STEPS=0", "--gin.MIN_LR_RATIO=1.0", "--gin.BATCH_SIZE=4",
          "--gin.SEQ_LEN=64", "--gin.flame_gin.run.log_interval=1", "--gin.flame_gin.run.eval_interval=0",
          "--gin.CHECKPOINT_INTERVAL=1000"]
VARLEN = ["--gin_file=gin/data/varlen.gin", "--gin.CONTEXT_LEN=24"]
FP32 = "--gin_bindings=parallelize.param_dtype = 'float32'"
# The primary's metric line: "[step] ..., loss=6.24355, ..." (6 significant digits).
LOSS = re.compile(r"\[(\d+)\] [^\n]*?\bloss=([0-9.e+-]+)")


def _env():
  return dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")


def train(workdir, *, steps, procs=1, extra=()):
  """Runs the trainer's command line; returns {step: loss} of the primary and its log."""
  args = [*COMMON, f"--gin.TRAIN_STEPS={steps}", f"--workdir={workdir}", *extra]
  if procs == 1:
    cmd = [sys.executable, "-m", "flame_gin.train", *args]
  else:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "flame_gin.train", *args]
  out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
  assert out.returncode == 0, out.stderr[-4000:]
  return {int(m.group(1)): float(m.group(2)) for m in LOSS.finditer(out.stderr)}, out.stderr


def assert_close(got, want, steps, rtol=1e-4):
  for step in steps:
    assert got[step] == pytest.approx(want[step], rel=rtol), (step, got[step], want[step])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  losses, _ = train(tmp_path_factory.mktemp("single"), steps=REF_STEPS)
  assert sorted(losses) == list(range(1, REF_STEPS + 1))
  assert losses[REF_STEPS] < losses[1]  # it learns
  return losses


def test_fsdp_matches_replicated_then_resumes_in_one_process(reference, tmp_path):
  replicated, log = train(tmp_path / "ddp", steps=PAR_STEPS, procs=2, extra=["--gin_file=gin/parallel/ddp.gin"])
  assert "dp_replicate=2 dp_shard=1" in log
  losses, log = train(tmp_path / "fsdp", steps=PAR_STEPS, procs=2, extra=["--gin_file=gin/parallel/fsdp.gin", FP32])
  assert "dp_replicate=1 dp_shard=2" in log
  assert sorted(losses) == list(range(1, PAR_STEPS + 1))
  assert_close(losses, replicated, range(1, PAR_STEPS + 1))
  # same initial weights as one process: only the data differs, by a little
  assert losses[1] == pytest.approx(reference[1], rel=1e-3)
  assert losses[PAR_STEPS] < losses[1]
  # the 2-rank sharded checkpoint (weights, optimizer, both data streams) resumes in a single process
  resumed, log = train(tmp_path / "fsdp", steps=REF_STEPS)
  assert f"resumed from step {PAR_STEPS}" in log
  assert sorted(resumed) == list(range(PAR_STEPS + 1, REF_STEPS + 1))
  assert all(abs(resumed[s] - losses[PAR_STEPS]) < 0.2 for s in resumed), (resumed, losses)


def test_tensor_parallel_matches_single_process(reference, tmp_path):
  losses, log = train(tmp_path, steps=PAR_STEPS, procs=2, extra=["--gin_file=gin/parallel/tp2.gin", FP32])
  assert "tp=2" in log and "data streams=1" in log
  assert_close(losses, reference, range(1, PAR_STEPS + 1))


def test_context_parallel_matches_single_process(reference, tmp_path):
  losses, log = train(tmp_path, steps=PAR_STEPS, procs=2, extra=["--gin_file=gin/parallel/cp2.gin", FP32])
  assert "cp=2" in log and "data streams=1" in log
  assert_close(losses, reference, range(1, PAR_STEPS + 1))


def test_context_parallel_varlen_matches_single_process_varlen(tmp_path):
  want, _ = train(tmp_path / "single", steps=PAR_STEPS, extra=VARLEN)
  losses, log = train(tmp_path / "cp", steps=PAR_STEPS, procs=2,
                      extra=[*VARLEN, "--gin_file=gin/parallel/cp2.gin", FP32])
  assert "cp=2" in log
  assert sorted(losses) == list(range(1, PAR_STEPS + 1))
  assert_close(losses, want, range(1, PAR_STEPS + 1))


def test_pipeline_parallel_matches_single_process_then_resumes_in_one_process(reference, tmp_path):
  losses, log = train(tmp_path, steps=PAR_STEPS, procs=2,
                      extra=["--gin_file=gin/parallel/pp2.gin", FP32, "--gin.build_pipeline.microbatches=2"])
  assert "pp=2" in log and "data streams=1" in log
  assert sorted(losses) == list(range(1, PAR_STEPS + 1))
  assert_close(losses, reference, range(1, PAR_STEPS + 1))
  # each stage wrote its own arrays under the unsplit model's names: the run goes on in one process, exactly
  resumed, log = train(tmp_path, steps=REF_STEPS)
  assert f"resumed from step {PAR_STEPS}" in log
  assert sorted(resumed) == list(range(PAR_STEPS + 1, REF_STEPS + 1))
  assert_close(resumed, reference, range(PAR_STEPS + 1, REF_STEPS + 1))


def _tiny_config():
  return models.build_config(family="gla", overrides=dict(hidden_size=32, num_hidden_layers=2, num_heads=2,
                                                          vocab_size=64))


def test_pipeline_with_context_parallel_is_a_config_error():
  with pytest.raises(config_lib.ConfigError, match=r"ParallelDims.pp=2 with ParallelDims.cp=2"):
    trainer._parallel_dims(make=functools.partial(ParallelDims, pp=2, cp=2), world_size=4, batch_size=4,
                           seq_len=64, varlen=False, model_config=_tiny_config())


def test_bad_split_is_a_config_error_before_anything_is_built():
  with pytest.raises(ValueError, match="not divisible by the data-parallel size 4"):
    trainer._parallel_dims(make=None, world_size=4, batch_size=6, seq_len=64, varlen=False,
                           model_config=_tiny_config())
