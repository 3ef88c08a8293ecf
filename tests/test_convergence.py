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
    # The comparison sees a one-line difference: decaying norms and embeddings too (flame's choice)...
    with tempfile.TemporaryDirectory() as workdir:
        convergence.parse(gin_files=["gin/tiny.gin"], bindings=[*bindings, "TRAIN_STEPS = 20"], workdir=workdir)
        other = convergence.reference_losses(steps=20, decay_all=True)
    assert max(abs(a - b) for a, b in zip(other, record["reference"])) > 10 * record["tolerance"]
    # flame's choice as an ablation (gin/ablations/decay_all.gin): the trainer with it is that loop.
    with tempfile.TemporaryDirectory() as workdir:
        gin_files = ["gin/tiny.gin", "gin/ablations/decay_all.gin"]
        convergence.parse(gin_files=gin_files, bindings=[*bindings, "TRAIN_STEPS = 20"], workdir=workdir)
        ablated = convergence.trainer_losses(workdir=workdir)
    assert max(abs(a - b) for a, b in zip(ablated, other)) <= 1e-4 and len(ablated) == 20


def _record(offset: float, second: float) -> dict:
    return {
        "device": "cpu",
        "steps": 10,
        "within_tolerance": True,
        "mean_diff_second_half": {"flame_gin": offset, "reference_bf16_logits": second},
    }


def test_the_seed_summary_flags_a_consistent_offset_and_not_scatter():
    import statistics

    scatter = [0.12, -0.1, 0.05, -0.07, 0.02, -0.03]
    summary = convergence.summarise([_record(x, -x) for x in scatter])
    assert summary["no_bias"] and summary["seeds"] == 6
    assert summary["offset_second_half"]["flame_gin"]["mean"] == pytest.approx(statistics.mean(scatter))
    assert summary["offset_second_half"]["flame_gin"]["sem"] == pytest.approx(statistics.stdev(scatter) / 6**0.5)
    biased = convergence.summarise([_record(0.1 + x / 10, x) for x in scatter])
    assert not biased["no_bias"]
