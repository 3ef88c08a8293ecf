"""A stop request (SIGTERM/SIGUSR2 flag) saves and exits 42 mid-run, but at the last step it is a normal finish."""

import pytest

from flame_gin import config as config_lib
from flame_gin import configurables
from flame_gin.checkpoint import REQUEUE_EXIT_CODE


def _run(*, workdir, steps):
    config_lib.parse(
        gin_files=["gin/tiny.gin"],
        gin_bindings=[
            f"MODEL_DIR = {str(workdir)!r}",
            f"TRAIN_STEPS = {steps}",
            "WARMUP_STEPS = 0",
            "flame_gin.evaluation.interval = 0",
            "CHECKPOINT_INTERVAL = 1000",
        ],
        search_paths=config_lib.default_search_paths(),
    )
    return configurables.run(config_text="", on_first_step=None, stop_requested=lambda: True)


@pytest.mark.parametrize("steps, status, saved", [(3, REQUEUE_EXIT_CODE, "1"), (1, 0, "1")])
def test_stop_request_saves_and_exits_42_unless_training_is_done(tmp_path, steps, status, saved):
    assert _run(workdir=tmp_path, steps=steps) == status
    committed = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert committed == [saved]
