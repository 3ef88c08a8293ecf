"""Faults during a save: kill -9 at random moments, and a full disk.

Both run the saving code in a child process (this file run as a script) so
that the fault hits a real process; the test process then checks that the
previous committed checkpoint is still the latest one and loads intact.
"""

import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _model(step: int) -> torch.nn.Module:
    """Weights that encode the step, so a loaded checkpoint proves its step."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 256))
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) + 1000 * step + i)
    return model


def _child(mode: str, root: str) -> None:
    from flame_gin.checkpoint import Checkpointer, CheckpointSaveError

    if mode == "loop":  # save forever; the parent kills us at some moment
        print("ready", flush=True)
        sys.stdin.readline()  # started ahead (imports done); go once the previous child is dead and checked
        ckpt = Checkpointer(directory=root, keep=2, async_save=True)
        for step in range(1, 10_000):
            model = _model(step)
            opt = torch.optim.AdamW(model.parameters())
            ckpt.save(step=step, model=model, optimizer=opt, extra={"s": step}, config_text="")
        return
    import resource

    ckpt = Checkpointer(directory=root, keep=2, async_save=False)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of a kill
    ckpt.save(step=1, model=_model(1), optimizer=None, extra={"s": 1}, config_text="")
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    try:
        ckpt.save(step=2, model=_model(2), optimizer=None, extra={"s": 2}, config_text="")
    except CheckpointSaveError as e:
        print("SAVE-ERROR", e, flush=True)
        sys.exit(3)
    sys.exit(0)


def _check_latest_loads(root: pathlib.Path) -> int:
    from flame_gin.checkpoint import Checkpointer

    ckpt = Checkpointer(directory=root, keep=2)
    step = ckpt.latest_step()
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 256))
    assert ckpt.restore(model=model) == {"s": step}
    for a, b in zip(model.parameters(), _model(step).parameters()):
        assert torch.equal(a, b), step
    return step


KILLS = 20


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_9_during_save_keeps_previous(tmp_path):
    """KILLS kill -9 at random moments of a stream of asynchronous saves: each restart finds a latest
    committed checkpoint that loads intact (a partial save is never taken, a damaged one never committed)."""
    rng = random.Random(0)

    def spawn():  # each child imports while its predecessor saves, and starts saving when told
        return subprocess.Popen(
            [sys.executable, __file__, "loop", str(tmp_path)],
            env=ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    ahead = spawn()
    try:
        for attempt in range(KILLS):
            proc, ahead = ahead, spawn() if attempt + 1 < KILLS else None
            assert proc.stdout.readline().strip() == b"ready"
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            # Wait for a first commit, then kill at a random moment mid-stream.
            deadline = time.monotonic() + 60
            while not any(p.name.isdigit() for p in tmp_path.iterdir()):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.5))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            step = _check_latest_loads(tmp_path)
            assert step >= 1, attempt
    finally:
        if ahead is not None:
            ahead.kill()
            ahead.wait()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_disk_full_commits_nothing(tmp_path):
    proc = subprocess.run(
        [sys.executable, __file__, "diskfull", str(tmp_path)],
        env=ENV,
        capture_output=True,
        timeout=50,
    )
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 3, out[-2000:]
    assert "saving step 2" in out and "nothing committed" in out
    assert "File too large" in out or "EFBIG" in out or "too large" in out.lower(), out[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]  # no tmp left
    assert _check_latest_loads(tmp_path) == 1


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
