"""The command line end to end, in subprocesses, as a user runs it.

Covers the embedded default (tiny GLA on the CPU reference kernels: loss falls, config files written,
deterministic), resume, and the bad-config cases: each exits non-zero with a message naming the fault and
leaves no run directory behind.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocess / multi-process runs: the full suite only

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ["--gin_file=gin/tiny.gin"]


def _losses(output: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"step (\d+)/\d+ \| loss ([\d.]+)", output)}


_BAD_CONFIGS = [
    (["--gin_bindings=flame_gin.run.sede = 1"], r"sede.*bindings string line 1"),
    (["--gin_bindings=flame_gin.nope.x = 1"], r"No configurable matching 'flame_gin.nope'"),
    (["--gin_file=gin/does_not_exist.gin"], r"does_not_exist.gin.*not found"),
    (["--gin.TRAIN_STEPS"], r"'--gin.TRAIN_STEPS': the shorthand needs a value"),
    (
        ["--gin_bindings=flame_gin.model_config.overrides = {'hidden_size': 32, 'num_head': 2}"],
        r"num_head.*did you mean 'num_heads'.*Valid keys",
    ),
    (["--gin.BATCH_SIZE=3", "--gin.flame_gin.run.grad_accum_steps=2"], r"BATCH_SIZE=3"),
    (["--gin_file=gin/model/mamba2.gin", "--gin_file=gin/data/varlen.gin"], r"varlen.*'mamba2' would let documents"),
    (  # refused while the model is parallelised (phase 5), after the run directory was made: it is removed
        [
            "--gin_bindings=flame_gin.run.parallelize = @flame_gin.parallelize",
            "--gin.flame_gin.parallelize.cpu_offload=True",
        ],
        r"cpu_offload=True keeps parameters on the host through FSDP, which this run does not apply",
    ),
    (
        ["--gin.flame_gin.parallelize.activation_checkpointing='full'"],  # no gin/parallel/ file: nothing calls it
        r"never applies: flame_gin.parallelize.activation_checkpointing.*flame_gin.run.parallelize = @flame_gin",
    ),
]
_SAME = [*TINY, "--gin.TRAIN_STEPS=6", "--gin.WARMUP_STEPS=2", "--gin.flame_gin.run.log_interval=1"]


class _Run:
    """A finished CLI process: ``returncode``, ``stdout``, ``stderr`` (as subprocess.run's result has them)."""

    def __init__(self, proc: subprocess.Popen):
        self.stdout, self.stderr = proc.communicate(timeout=600)
        self.returncode = proc.returncode


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Every CLI process of this file started at once: each is its own process whose time is mostly imports on
    one core, so they share the cores instead of queueing. The re-parse of the tiny run's config.gin starts as
    soon as that run has finished. Maps a name to (workdir, finished run)."""
    base = tmp_path_factory.mktemp("cli")
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")

    def start(*args, cwd=ROOT, nice=0):
        return subprocess.Popen(
            [sys.executable, "-m", "flame_gin.train", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )

    (base / "elsewhere").mkdir()
    cases = {
        "tiny": (
            base / "tiny" / "run",
            lambda w: [*TINY, f"--workdir={w}", "--gin.TRAIN_STEPS=40", "--gin.flame_gin.run.log_interval=5"],
            ROOT,
        ),
        "same_a": (base / "same" / "a", lambda w: [*_SAME, f"--workdir={w}"], ROOT),
        "same_b": (base / "same" / "b", lambda w: [*_SAME, f"--workdir={w}"], ROOT),
        "print_config": (
            base / "print" / "w",
            lambda w: [*TINY, f"--workdir={w}", "--print_config", "--gin.LR=0.123"],
            ROOT,
        ),
        "missing_workdir": (None, lambda w: [*TINY], ROOT),
        "other_directory": (
            base / "elsewhere" / "w",
            lambda w: [*TINY, f"--workdir={w}", "--print_config"],
            base / "elsewhere",
        ),
        **{
            f"bad{i}": (base / "bad" / f"w{i}", lambda w, args=args: [*TINY, f"--workdir={w}", *args], ROOT)
            for i, (args, _) in enumerate(_BAD_CONFIGS)
        },
    }
    # The tiny run and the re-parse after it are the longest chain: they keep the normal priority, the others
    # (independent of it) yield to them.
    started = {
        name: (workdir, start(*make_args(workdir), cwd=cwd, nice=0 if name == "tiny" else 10))
        for name, (workdir, make_args, cwd) in cases.items()
    }
    out = {}
    workdir, proc = started.pop("tiny")
    out["tiny"] = (workdir, _Run(proc))
    if out["tiny"][1].returncode == 0:
        out["reparse"] = (None, _Run(start("--gin_file=" + str(workdir / "config.gin"), "--print_config")))
    for name, (workdir, proc) in started.items():
        out[name] = (workdir, _Run(proc))
    return out


@pytest.fixture(scope="module")
def tiny_run(cli_runs):
    workdir, result = cli_runs["tiny"]
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_tiny_default_trains_and_loss_falls(tiny_run):
    workdir, result = tiny_run
    losses = _losses(result.stderr)
    assert sorted(losses) == list(range(5, 41, 5)), result.stderr[-2000:]
    assert losses[40] < losses[5] - 0.5, losses
    assert len(re.findall(r"first step done in [\d.]+ s", result.stderr)) == 1  # flame_gin.first_step


def test_console_holds_no_known_noise(tiny_run):
    """The known-harmless messages of the libraries underneath (``flame_gin.quiet``) and the resolved config as
    text stay off the console, and a CPU run makes no Triton kernel cache."""
    workdir, result = tiny_run
    for noise in (
        "Triton is not supported",
        "Failed to load",
        "is an Enum subclass",
        "system_path_file_exists",
        "version 0.",
        "Got texts",
        "are deprecated. Use `cache`",
        "# Parameters for",
    ):
        assert noise not in result.stderr, noise
    assert "step 40/40" in result.stderr
    assert not (workdir / "kernel_cache").exists()


def test_config_files_written_and_reparseable(tiny_run, cli_runs):
    workdir, _ = tiny_run
    config = (workdir / "config.gin").read_text()
    operative = (workdir / "operative_config.gin").read_text()
    assert "TRAIN_STEPS = 40" in config
    assert "run.train_steps = %TRAIN_STEPS" in operative
    _, result = cli_runs["reparse"]  # --gin_file=<workdir>/config.gin --print_config
    assert result.returncode == 0, result.stderr[-2000:]
    assert "TRAIN_STEPS = 40" in result.stdout


def test_same_config_gives_identical_losses(cli_runs):
    (_, first), (_, second) = cli_runs["same_a"], cli_runs["same_b"]  # two workdirs, the same arguments
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:]
    assert len(_losses(first.stderr)) == 6
    assert _losses(first.stderr) == _losses(second.stderr)


def test_print_config_builds_nothing(cli_runs):
    workdir, result = cli_runs["print_config"]
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LR = 0.123" in result.stdout
    assert not workdir.exists()


@pytest.mark.parametrize("case", range(len(_BAD_CONFIGS)), ids=[m for _, m in _BAD_CONFIGS])
def test_bad_config_is_named_and_leaves_no_debris(cli_runs, case):
    workdir, result = cli_runs[f"bad{case}"]
    returncode, stderr = result.returncode, result.stderr
    assert returncode != 0
    assert re.search(_BAD_CONFIGS[case][1], stderr, re.DOTALL), stderr[-2000:]
    assert "Traceback" not in stderr
    assert "In call to configurable" not in stderr  # gin's call path is not part of the message
    assert not workdir.exists()


def test_missing_workdir_names_model_dir(cli_runs):
    _, result = cli_runs["missing_workdir"]  # no --workdir
    assert result.returncode != 0
    assert "MODEL_DIR" in result.stderr


def test_gin_file_found_from_another_directory(cli_runs):
    _, result = cli_runs["other_directory"]  # run with cwd outside the repository
    assert result.returncode == 0, result.stderr[-2000:]
