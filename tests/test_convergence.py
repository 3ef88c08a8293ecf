"""The trainer's loss curve is the plain loop's on the same tokens (float32, CPU): benchmarks/convergence.py's
reference (AutoModelForCausalLM forward, F.cross_entropy, torch's AdamW with decay on matrices only,
clip_grad_norm_, the cosine formula written out) against flame_gin.run, 20 steps of the tiny GLA."""

import pathlib
import sys
import tempfile

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import convergence  # noqa: E402


@pytest.mark.slow
def test_trainer_matches_a_plain_loop_on_the_same_tokens():
  bindings = ["WEIGHT_DECAY = 0.5", "WARMUP_STEPS = 3", "flame_gin.run.max_grad_norm = 0.5"]
  record = convergence.compare(gin_files=["gin/tiny.gin"], bindings=bindings, steps=20)
  assert record["within_tolerance"], record
  assert record["max_abs_diff"] <= 1e-4 and len(record["flame_gin"]) == 20
  assert record["flame_gin"][-1] < record["flame_gin"][0] - 0.2  # it learns, so agreement is not trivial
  # The comparison sees a one-line difference: decaying norms and embeddings too (flame's choice).
  with tempfile.TemporaryDirectory() as workdir:
    convergence.parse(gin_files=["gin/tiny.gin"], bindings=[*bindings, "TRAIN_STEPS = 20"], workdir=workdir)
    other = convergence.reference_losses(steps=20, decay_all=True)
  assert max(abs(a - b) for a, b in zip(other, record["reference"])) > 10 * record["tolerance"]
