"""The headline resume test: a run stopped by SIGTERM and resumed is the same run as an uninterrupted one.

Both runs go through the real command line with the real data pipeline and checkpoints. The interrupted run
gets SIGTERM mid-training, must save and exit 42 (the requeue convention), and the resumed run must then
produce bit-identical losses at every step and bit-identical final parameters.
"""

import logging
import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest
import torch

from flame_gin import checkpoint, models

pytestmark = pytest.mark.slow  # subprocess / multi-process runs: the full suite only

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = 12
ARGS = [
    "--gin_file=gin/tiny.gin",
    f"--gin.TRAIN_STEPS={STEPS}",
    "--gin.WARMUP_STEPS=3",
    "--gin.flame_gin.run.log_interval=1",
    "--gin.flame_gin.evaluation.interval=0",
    "--gin.CHECKPOINT_INTERVAL=1000",
]
LOSS = re.compile(r"step (\d+)/\d+ \| loss ([\d.]+)")


def _cmd(workdir):
    return [sys.executable, "-m", "flame_gin.train", *ARGS, f"--workdir={workdir}"]


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")


def _losses(text):
    return {int(m.group(1)): m.group(2) for m in LOSS.finditer(text)}


def _final_params(workdir):
    config = models.build_config(
        family="gla",
        overrides=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_heads=2,
            vocab_size=512,
            intermediate_size=128,
            expand_k=0.5,
            expand_v=1,
            use_output_gate=True,
            use_short_conv=False,
            tie_word_embeddings=False,
        ),
    )
    model = models.build_model(config=config, device="cpu", seed=0)
    ckpt = checkpoint.Checkpointer(directory=workdir / "checkpoints")
    extra = ckpt.restore(model=model)
    ckpt.close()
    assert extra["train_state"]["step"] == STEPS
    return model.state_dict()


def test_sigterm_then_resume_is_bit_identical(tmp_path):
    # The uninterrupted run is independent of the interrupted one: it runs alongside it (most of each process is
    # imports on one core) and is read after the resume.
    straight_log = tmp_path / "straight.log"
    with open(straight_log, "w") as log:
        straight_proc = subprocess.Popen(
            _cmd(tmp_path / "straight"), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=log, text=True
        )
    try:
        first_text, workdir, stopped_at, resumed = _interrupt_then_resume(tmp_path)
        straight_proc.wait(timeout=300)
    except BaseException:
        straight_proc.kill()
        straight_proc.wait()
        raise
    straight_stderr = straight_log.read_text()
    assert straight_proc.returncode == 0, straight_stderr[-3000:]
    reference = _losses(straight_stderr)
    assert sorted(reference) == list(range(1, STEPS + 1))

    assert f"resumed from step {stopped_at}" in resumed.stderr
    second = _losses(resumed.stderr)
    assert sorted(second) == list(range(stopped_at + 1, STEPS + 1))
    combined = {**_losses(first_text), **second}
    assert combined == reference

    a, b = _final_params(tmp_path / "straight"), _final_params(workdir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _interrupt_then_resume(tmp_path):
    """SIGTERM at step 5 (must save and exit 42), then the same command again; returns the first run's log, its
    workdir, the step it stopped at and the resumed run's result."""
    workdir = tmp_path / "interrupted"
    proc = subprocess.Popen(
        _cmd(workdir), cwd=ROOT, env=_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    first_part = []
    for line in proc.stderr:
        first_part.append(line)
        if " step 5/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, rest = proc.communicate(timeout=300)
    first_text = "".join(first_part) + rest
    assert proc.returncode == 42, first_text[-3000:]
    stopped_at = max(_losses(first_text))
    assert 5 <= stopped_at < STEPS

    resumed = subprocess.run(_cmd(workdir), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return first_text, workdir, stopped_at, resumed


def test_damaged_latest_checkpoint_falls_back_and_the_run_is_the_same(tmp_path, train_tiny, caplog):
    """A run whose latest checkpoint was damaged after it ended (one data file truncated) is run again by the
    command: it warns once, moves the damaged step aside, resumes from the previous checkpoint and repeats the
    lost steps with the losses of the first run (made in this process, with the same settings), then commits
    that step afresh. No traceback."""
    caplog.set_level(logging.INFO)
    workdir = tmp_path / "run"
    cmd = [*_cmd(workdir), "--gin.TRAIN_STEPS=8", "--gin.CHECKPOINT_INTERVAL=4"]
    same = ("WARMUP_STEPS = 3", "flame_gin.run.log_interval = 1", "CHECKPOINT_INTERVAL = 4")
    train_tiny(workdir, steps=8, bindings=same)
    first_losses = _losses("\n".join(r.getMessage() for r in caplog.records))
    assert sorted(first_losses) == list(range(1, 9))
    ckpts = workdir / "checkpoints"
    assert checkpoint.layout.committed_steps(ckpts) == [4, 8]
    data = max((p for p in (ckpts / "8" / "optimizer").rglob("d/*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(data, data.stat().st_size // 2)
    again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr
    warnings = [line for line in again.stderr.splitlines() if "is damaged" in line]
    assert len(warnings) == 1 and "checkpoint step 8" in warnings[0] and "resuming from step 4" in warnings[0]
    assert "resumed from step 4" in again.stderr
    repeated = _losses(again.stderr)
    assert repeated == {s: first_losses[s] for s in (5, 6, 7, 8)}
    assert checkpoint.layout.committed_steps(ckpts) == [4, 8]
    assert (ckpts / "8.damaged" / "DAMAGED.txt").is_file()
