"""``python -m flame_gin.compare``: two tiny runs (two learning rates) rendered into one PNG and a table whose
final loss is the mean of the last logged training losses as the trainer printed them."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOSS = re.compile(r"\] \[(\d+)\] [^\n]*?\bloss=([0-9.e+-]+)")


@pytest.mark.slow
def test_compare_renders_two_runs_and_tabulates_them(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    procs = {  # both runs at once: each is mostly imports on one core
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flame_gin.train",
                "--gin_file=gin/tiny.gin",
                "--gin.TRAIN_STEPS=20",
                f"--gin.LR={lr}",
                "--gin.WARMUP_STEPS=2",
                "--gin.flame_gin.run.log_interval=2",
                "--gin.flame_gin.evaluation.interval=10",
                f"--workdir={tmp_path / name}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, lr in (("a", "3e-3"), ("b", "1e-3"))
    }
    logs = {}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        logs[name] = [float(v) for _, v in LOSS.findall(stderr)]
    out = tmp_path / "compare.png"
    proc = subprocess.run(
        [sys.executable, "-m", "flame_gin.compare", str(tmp_path / "a"), str(tmp_path / "b"), f"--out={out}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from matplotlib import image

    pixels = image.imread(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert pixels.shape[0] > 300 and pixels.shape[1] > 1000 and pixels[..., :3].std() > 0.05  # drawn, not blank
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:3]}
    for name in ("a", "b"):
        row = rows[str(tmp_path / name)]
        assert row[1] == "20"
        assert float(row[2]) == pytest.approx(sum(logs[name][-10:]) / 10, abs=1e-3)
    assert float(rows[str(tmp_path / "a")][2]) < float(rows[str(tmp_path / "b")][2])  # the higher LR learns faster here

    from flame_gin import compare  # the refusal path in process (the command line's exit status is main's return)

    assert compare.main(["compare", str(tmp_path)]) == 2
    assert "no tensorboard/ folder" in capsys.readouterr().err
