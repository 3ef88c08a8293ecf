"""How a run starts: seed checkpoint -> warm start with identical weights; a given step; the CLI wiring."""

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from flame_gin import checkpoint, models, process, start

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=128)


class _NoData:
    def load_state_dict(self, state):
        raise AssertionError("a warm start must not touch the data state")


def test_seed_checkpoint_gives_identical_weights_to_a_differently_seeded_model(tmp_path):
    config = models.build_config(family="gla", overrides=CONFIG)
    seeded = models.build_model(config=config, device="cpu", seed=1)
    directory = start.save_seed(workdir=tmp_path, model=seeded, config_text="")
    other = models.build_model(config=config, device="cpu", seed=2)
    assert not torch.equal(other.lm_head.weight, seeded.lm_head.weight)
    restored = start.resume_or_initialise(ckpt=None, model=other, optimizer=None, loader=_NoData(), init_from=directory)
    assert restored is None  # a warm start begins at step 0
    for (name, a), (_, b) in zip(seeded.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name


def test_own_checkpoint_wins_over_warm_start_and_honours_restore_step(tmp_path):
    config = models.build_config(family="gla", overrides=CONFIG)
    model = models.build_model(config=config, device="cpu", seed=0)
    ckpt = checkpoint.Checkpointer(directory=tmp_path / "run")
    for step in (2, 4):
        with torch.no_grad():
            model.lm_head.weight.fill_(float(step))
        ckpt.save(
            step=step,
            model=model,
            optimizer=None,
            config_text="",
            force=True,
            extra={
                "train_state": {"step": step, "tokens_seen": 10 * step, "skipped_steps": 0},
                "data": {"position": step},
                "rng": process.rng_state(),
            },
        )

    class Loader:
        state = None

        def load_state_dict(self, state):
            Loader.state = state

    fresh = models.build_model(config=config, device="cpu", seed=5)
    state = start.resume_or_initialise(
        ckpt=ckpt, model=fresh, optimizer=None, loader=Loader(), restore_step=2, init_from=str(tmp_path / "elsewhere")
    )
    assert state == {"step": 2, "tokens_seen": 20, "skipped_steps": 0}
    assert Loader.state == [{"position": 2}]
    assert torch.all(fresh.lm_head.weight == 2.0)
    ckpt.close()


@pytest.mark.slow
def test_cli_seed_checkpoint_then_warm_start(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    base = [
        sys.executable,
        "-m",
        "flame_gin.train",
        "--gin_file=gin/tiny.gin",
        "--gin.WARMUP_STEPS=0",
        "--gin.flame_gin.run.log_interval=1",
        "--gin.flame_gin.evaluation.interval=0",
    ]
    seed = subprocess.run(
        [*base, f"--workdir={tmp_path / 'seed'}", "--gin.flame_gin.start.seed_checkpoint_only=True"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert seed.returncode == 0, seed.stderr[-2000:]
    assert (tmp_path / "seed" / "seed_checkpoint" / "0").is_dir()
    assert not re.search(r"step \d+/", seed.stderr)  # no training step ran
    warm = subprocess.run(
        [
            *base,
            f"--workdir={tmp_path / 'warm'}",
            "--gin.TRAIN_STEPS=2",
            "--gin.SEED=7",
            f"--gin.flame_gin.start.init_from='{tmp_path / 'seed' / 'seed_checkpoint'}'",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert warm.returncode == 0, warm.stderr[-2000:]
    assert "warm start: weights of step 0" in warm.stderr and "step 2/2" in warm.stderr
