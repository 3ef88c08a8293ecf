"""launch/slurm/train.sbatch on a real single-node Slurm cluster started by this test (CPU only).

The test starts munged and a minimal slurmctld + slurmd on this machine (needs root and Debian's `slurm-wlm` and
`munge`; skips with the reason printed otherwise), submits the sbatch script on the tiny config, sends the
time-limit warning signal (SIGUSR2 to the batch shell, as `--signal=B:USR2@90` does) once training is under way,
and checks that the job requeued itself (SLURM_RESTART_COUNT rises), resumed from its checkpoint and finished
every step without losing one.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
TRAIN_STEPS = 300  # ~40 ms a step here: leaves seconds for the signal to land mid-run


def _skip(reason: str):
    print(f"SKIP test_launch_slurm: {reason}", file=sys.stderr)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, *, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Cluster:
    """munged + slurmctld + slurmd in one temporary directory; daemons stopped by their process ids."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"))

    def start(self) -> None:
        munge_dir = self.root / "munge"
        munge_dir.mkdir()
        munge_dir.chmod(0o755)  # munged requires its socket folder to be searchable by all
        shutil.chown(munge_dir, "munge", "munge")
        key = pathlib.Path("/etc/munge/munge.key")
        if not key.exists():
            key.write_bytes(os.urandom(128))
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        sock = munge_dir / "munge.socket"
        self._spawn(
            [
                "runuser",
                "-u",
                "munge",
                "--",
                "munged",
                "-F",
                f"--socket={sock}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--log-file={munge_dir / 'munged.log'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ],
            log="munged.out",
        )
        _wait_for(lambda: sock.exists() or self.procs[0].poll() is not None, timeout=15, what="munged's socket")
        if not sock.exists():
            raise RuntimeError("munged did not start:\n" + self.logs())

        host = socket.gethostname()
        for d in ("state", "spool"):
            (self.root / d).mkdir()
        (self.root / "slurm.conf").write_text(f"""\
ClusterName=flame_gin_test
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobRequeue=1
ReturnToService=2
StateSaveLocation={self.root / "state"}
SlurmdSpoolDir={self.root / "spool"}
SlurmctldPidFile={self.root / "slurmctld.pid"}
SlurmdPidFile={self.root / "slurmd.pid"}
SlurmctldLogFile={self.root / "slurmctld.log"}
SlurmdLogFile={self.root / "slurmd.log"}
SchedulerType=sched/backfill
KillWait=60
NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        self._spawn(["slurmctld", "-D", "-c", "-i"], log="slurmctld.out")
        self._spawn(["slurmd", "-D"], log="slurmd.out")
        _wait_for(
            lambda: "idle" in self.run("sinfo", "-h", "-o", "%t", check=False).stdout,
            timeout=30,
            what="the node to be idle in sinfo",
        )

    def _spawn(self, cmd: list[str], *, log: str) -> None:
        out = open(self.root / log, "wb")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT))

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=30)

    def job_field(self, job_id: str, field: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        m = re.search(rf"\b{field}=(\S+)", out)
        return m.group(1) if m else ""

    def stop(self) -> None:
        for proc in reversed(self.procs):  # slurmd, slurmctld, then munged
            if proc.poll() is None:
                # munged runs under runuser: signal munged itself (its pid file) as well as runuser.
                pid_file = self.root / "munge" / "munged.pid"
                if proc.args[0] == "runuser" and pid_file.exists():
                    try:
                        os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
                    except (ValueError, ProcessLookupError):
                        pass
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out"))
        )


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        _skip("starting slurmctld/slurmd/munged needs root")
    missing = [p for p in ("slurmctld", "slurmd", "sbatch", "munged", "runuser") if shutil.which(p) is None]
    if missing:
        _skip(f"not installed: {', '.join(missing)} (apt-get install -y slurm-wlm munge)")
    root = pathlib.Path(tempfile.mkdtemp(prefix="flame_gin_slurm_"))
    root.chmod(0o755)  # munged (as user munge) must reach its socket folder
    c = Cluster(root)
    try:
        c.start()
    except Exception:
        c.stop()
        print(c.logs(), file=sys.stderr)
        raise
    yield c
    c.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_sbatch_preempt_requeue_resume(cluster, tmp_path):
    workdir = tmp_path / "run"
    out = tmp_path / "job.out"
    env = dict(
        cluster.env,
        FLAME_GIN_PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        FLAME_GIN_CACHE=os.environ.get("FLAME_GIN_CACHE", str(pathlib.Path.home() / ".cache" / "flame_gin")),
    )
    submit = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--output={out}",
            f"--chdir={REPO}",
            "--time=10",
            str(SBATCH),
            "--gin_file=gin/tiny.gin",
            f"--workdir={workdir}",
            f"--gin.TRAIN_STEPS={TRAIN_STEPS}",
            "--gin.WARMUP_STEPS=2",
            "--gin.BATCH_SIZE=2",
            "--gin.SEQ_LEN=32",
            "--gin_bindings=flame_gin.run.log_interval=1",
            "--gin_bindings=flame_gin.evaluation.interval=0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    text = lambda: out.read_text(errors="replace") if out.exists() else ""
    try:
        # Let training get under way, then send the time-limit warning to the batch shell only.
        ended = lambda: cluster.job_field(job_id, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "")
        _wait_for(lambda: re.search(r"step [2-9]/", text()) or ended(), timeout=120, what="step 2 in the job output")
        assert not ended(), "the job ended before it could be preempted:\n" + text()[-4000:]
        cluster.run("scancel", "--batch", "--signal=USR2", job_id)
        _wait_for(
            lambda: cluster.job_field(job_id, "Restarts") not in ("", "0"), timeout=90, what="the job to be requeued"
        )
        # Skip the ~2 minute BeginTime Slurm puts on requeued jobs.
        _wait_for(lambda: cluster.job_field(job_id, "JobState") == "PENDING", timeout=60, what="the job pending again")
        # slurmd refuses to relaunch a job within the second its old credential was revoked ("Job credential
        # revoked"): let that second pass before moving the start time to now.
        time.sleep(2)
        cluster.run("scontrol", "update", f"jobid={job_id}", "StartTime=now")
        _wait_for(ended, timeout=150, what="the job to finish after the requeue")
    except AssertionError:
        print(text(), cluster.logs(), sep="\n", file=sys.stderr)
        raise
    finally:
        cluster.run("scancel", job_id, check=False)

    log = text()
    print(log[-4000:])
    assert cluster.job_field(job_id, "JobState") in ("COMPLETED", ""), log[-3000:] + "\n" + cluster.logs()
    assert "restart 0:" in log and "restart 1:" in log, log[-3000:]
    assert "requeueing job" in log, log[-3000:]
    saved = re.search(r"state saved at step (\d+)", log)
    resumed = re.search(r"resumed from step (\d+)", log)
    assert saved and resumed, log[-3000:]
    k = int(resumed.group(1))
    assert k == int(saved.group(1)) and 0 < k < TRAIN_STEPS
    # No step lost or repeated: before the requeue steps 1..k ran, after it k+1..TRAIN_STEPS.
    first, second = log.split("restart 1:", 1)
    steps_before = [int(s) for s in re.findall(rf"step (\d+)/{TRAIN_STEPS}\b", first)]
    steps_after = [int(s) for s in re.findall(rf"step (\d+)/{TRAIN_STEPS}\b", second)]
    assert steps_before == list(range(1, k + 1)), steps_before
    assert steps_after == list(range(k + 1, TRAIN_STEPS + 1)), steps_after
    assert "training finished" in second
