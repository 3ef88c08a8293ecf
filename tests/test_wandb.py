"""The W&B writer under several ranks and restarts, in W&B's offline mode (no network): rank 0 alone opens a
run; a resumed run continues the same W&B run id (kept in the run directory); the resolved gin config and the
hyper-parameters are recorded in the run."""

import os
import pathlib
import subprocess
import sys

import pytest

from flame_gin import metrics, wandb_writer

wandb = pytest.importorskip("wandb")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_only_global_rank_zero_opens_a_run(tmp_path, monkeypatch):
    opened = []
    monkeypatch.setattr(wandb, "init", lambda **kw: opened.append(kw))
    factory = lambda workdir: opened.append(workdir)  # noqa: E731
    metrics.create_writers(workdir=tmp_path, is_primary=False, extra=[factory]).close()
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it on the second process
    writer = wandb_writer.WandbWriter(project="p", mode="offline", workdir=str(tmp_path / "run"))
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_hparams({"lr": 1e-3})
    writer.close()
    assert opened == [] and not (tmp_path / "run").exists()
    monkeypatch.setenv("RANK", "0")
    metrics.create_writers(
        workdir=tmp_path,
        is_primary=True,
        asynchronous=False,
        tensorboard=False,
        extra=[lambda workdir: wandb_writer.WandbWriter(project="p", workdir=workdir)],
    )
    assert len(opened) == 1 and opened[0]["id"] == (tmp_path / wandb_writer.RUN_ID_FILE).read_text().strip()
    assert opened[0]["resume"] == "allow" and opened[0]["dir"] == str(tmp_path)


@pytest.mark.slow
def test_two_process_job_makes_one_wandb_run_and_its_resume_continues_it(tmp_path):
    workdir = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    for steps in (3, 5):  # each start: two processes under torchrun (gloo), as a 2-GPU job
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                "-m",
                "flame_gin.train",
                "--gin_file=gin/tiny.gin",
                f"--gin.TRAIN_STEPS={steps}",
                "--gin.WARMUP_STEPS=0",
                "--gin.flame_gin.evaluation.interval=0",
                f"--workdir={workdir}",
                "--gin_bindings=flame_gin.metric_writers.extra = [@flame_gin.wandb_writer]",
                "--gin_bindings=flame_gin.wandb_writer.project = 'tiny'",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = (workdir / wandb_writer.RUN_ID_FILE).read_text().strip()
    runs = sorted((workdir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs), runs  # one per start, not per rank
    first, second = ((r / f"run-{run_id}.wandb").read_bytes() for r in runs)
    assert b"TRAIN_STEPS = 3" in first and b"TRAIN_STEPS = 5" in second  # the resolved gin config
    assert b"train_steps" in first and b"text/config" in first  # hparams and the config's key
