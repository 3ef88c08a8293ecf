"""Shared test set-up: quiet FLA's CPU warning, keep caches inside the test session's temp area."""

import os
import warnings

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message="Triton is not supported on current platform")


@pytest.fixture
def train_tiny():
    """Trains the embedded tiny default in this process for a few steps, no evaluation, into ``workdir`` (its
    final checkpoint is the one at ``steps``); returns ``workdir``. Extra gin files layer over ``gin/tiny.gin``
    and extra bindings over these defaults."""
    from flame_gin import config as config_lib
    from flame_gin import configurables

    def train(workdir, *, steps: int = 3, gin_files: tuple[str, ...] = (), bindings: tuple[str, ...] = ()):
        config_lib.parse(
            gin_files=["gin/tiny.gin", *gin_files],
            gin_bindings=[
                f"MODEL_DIR = {str(workdir)!r}",
                f"TRAIN_STEPS = {steps}",
                "WARMUP_STEPS = 0",
                "flame_gin.evaluation.interval = 0",
                *bindings,
            ],
            search_paths=config_lib.default_search_paths(),
        )
        assert configurables.run(config_text="", on_first_step=None) == 0
        return workdir

    return train
