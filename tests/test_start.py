"""How a run starts: seed checkpoint -> warm start with identical weights; a given step; the CLI wiring."""

import logging
import pathlib
import re

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
def test_seed_checkpoint_then_warm_start(tmp_path, train_tiny, caplog):
    """``seed_checkpoint_only`` writes the initial weights and trains nothing; a run with ``init_from`` that
    seed checkpoint starts from those weights (and another seed) and trains (in this process: the command's
    flags are the same bindings, checked in test_cli)."""
    caplog.set_level(logging.INFO)
    train_tiny(tmp_path / "seed", bindings=("flame_gin.start.seed_checkpoint_only = True",))
    assert (tmp_path / "seed" / "seed_checkpoint" / "0").is_dir()
    assert not (tmp_path / "seed" / "checkpoints").exists() or not any((tmp_path / "seed" / "checkpoints").iterdir())
    assert not any(re.search(r"step \d+/", r.getMessage()) for r in caplog.records)  # no training step ran
    caplog.clear()
    seeded = f"flame_gin.start.init_from = {str(tmp_path / 'seed' / 'seed_checkpoint')!r}"
    train_tiny(tmp_path / "warm", steps=2, bindings=(seeded, "SEED = 7", "flame_gin.run.log_interval = 1"))
    messages = [r.getMessage() for r in caplog.records]
    assert any("warm start: weights of step 0" in m for m in messages), messages[-20:]
    assert any("step 2/2" in m for m in messages)
