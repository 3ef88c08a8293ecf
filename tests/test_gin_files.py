"""No shipped config can rot: every top-level experiment file parses, builds at a tiny size and exits.

Each ``gin/*.gin`` runs through the real command line for 0 steps with the embedded data layered on top (the
real sources need network) and the model shrunk through its macros; the run must validate, build the data
pipeline and the model, and exit 0. Every gin file also opens with the command that runs it.
"""

import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocess / multi-process runs: the full suite only

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOP_LEVEL = sorted(p.name for p in (ROOT / "gin").glob("*.gin") if p.name != "base.gin")
TINY_OVERRIDES = [
    "--gin.TRAIN_STEPS=0",
    "--gin.WARMUP_STEPS=0",
    "--gin.BATCH_SIZE=1",
    "--gin.SEQ_LEN=32",
    "--gin.HIDDEN_SIZE=32",
    "--gin.NUM_LAYERS=1",
    "--gin.NUM_HEADS=2",
    "--gin.NUM_KV_HEADS=2",
    "--gin.INTERMEDIATE_SIZE=64",
    "--gin.VOCAB_SIZE=512",
    "--gin.flame_gin.run.eval_interval=0",
]


ABLATIONS = sorted(p.name for p in (ROOT / "gin" / "ablations").glob("*.gin"))


def _dry_run_args(name: str, workdir: pathlib.Path) -> list[str]:
    return [f"--gin_file=gin/{name}", "--gin_file=gin/data/embedded.gin", *TINY_OVERRIDES, f"--workdir={workdir}"]


def _ablation_args(name: str, workdir: pathlib.Path) -> list[str]:
    return [
        "--gin_file=gin/tiny.gin",
        f"--gin_file=gin/ablations/{name}",
        "--gin.TRAIN_STEPS=1",
        "--gin.WARMUP_STEPS=0",
        "--gin.flame_gin.run.eval_interval=0",
        "--gin.flame_gin.run.log_interval=1",
        f"--workdir={workdir}",
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every dry run and ablation run started at once (most of each process is imports and model building on
    one core), so they share the cores instead of queueing. Maps (kind, name) to (workdir, returncode, stderr)."""
    base = tmp_path_factory.mktemp("gin_runs")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    cases = [("top", n, _dry_run_args) for n in TOP_LEVEL] + [("ablation", n, _ablation_args) for n in ABLATIONS]
    started = {}
    for kind, name, make_args in cases:
        workdir = base / kind / name / "w"
        started[kind, name] = (
            workdir,
            subprocess.Popen(
                [sys.executable, "-m", "flame_gin.train", *make_args(name, workdir)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    out = {}
    for key, (workdir, proc) in started.items():
        _, stderr = proc.communicate(timeout=600)
        out[key] = (workdir, proc.returncode, stderr)
    return out


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_top_level_gin_file_dry_runs(name, runs):
    workdir, returncode, stderr = runs["top", name]
    assert returncode == 0, stderr[-3000:]
    assert "parameters" in stderr and (workdir / "config.gin").exists()


@pytest.mark.parametrize("name", ABLATIONS)
def test_ablation_layers_over_the_tiny_experiment(name, runs):
    _, returncode, stderr = runs["ablation", name]
    assert returncode == 0, stderr[-3000:]
    assert "step 1/1" in stderr


def test_extra_overrides_change_one_key_and_are_checked():
    from flame_gin import models

    config = models.build_config(
        family="gla", overrides={"hidden_size": 32, "use_short_conv": False}, extra_overrides={"use_short_conv": True}
    )
    assert config.use_short_conv is True and config.hidden_size == 32
    with pytest.raises(ValueError, match="use_short_cnv"):
        models.build_config(family="gla", overrides={}, extra_overrides={"use_short_cnv": True})


def test_every_gin_file_opens_with_its_command():
    files = sorted((ROOT / "gin").rglob("*.gin"))
    assert len(files) > 40
    for path in files:
        head = "".join(path.read_text().splitlines(keepends=True)[:6])
        assert head.startswith("#"), f"{path} does not open with a comment"
        assert "python -m flame_gin.train" in head or "torchrun" in head, f"{path}: no command in its header"
