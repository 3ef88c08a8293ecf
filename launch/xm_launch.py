"""Launch one training run or a grid sweep of gin bindings with XManager, locally or on Slurm.

A sweep point is a list of gin bindings; the grid is the product of the ``--sweep`` axes. Every point becomes an
XManager work unit with its own run directory ``<workdir_root>/<experiment id>/<work unit id>``; its bindings are
written there as ``bindings.gin`` (local executor) and the trainer records the full config in ``config.gin``.

    # one run
    python launch/xm_launch.py --gin_file=gin/tiny.gin --workdir_root=runs/xm
    # learning rate x model size, 8 processes per point
    python launch/xm_launch.py --gin_file=gin/gla.gin --sweep=LR=1e-4,3e-4,1e-3 \
        --sweep=HIDDEN_SIZE=512,1024 --nproc=8
    # the same grid on Slurm through xmanager-slurm (runs the given container image there)
    python launch/xm_launch.py --executor=slurm --slurm_image=ghcr.io/me/flame_gin:latest ...

``--sweep=NAME=v1,v2`` values are gin literals; commas inside brackets or quotes do not split. The local executor
runs ``launch/local.sh`` (torchrun) on this machine. Runs in the interpreter that has ``xmanager`` installed; the
trainer runs in ``--python`` (default: FLAME_GIN_PYTHON, else ``python3``).
"""

from __future__ import annotations

import itertools
import os
import pathlib
import shlex
import sys

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[1]

_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "Gin files of every point, in order.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings of every point.")
_SWEEP = flags.DEFINE_multi_string("sweep", [], "A grid axis NAME=v1,v2,...: points are the product of the axes.")
_TITLE = flags.DEFINE_string("title", "flame_gin", "Experiment title.")
_EXECUTOR = flags.DEFINE_enum("executor", "local", ["local", "slurm"], "Where the work units run.")
_WORKDIR_ROOT = flags.DEFINE_string("workdir_root", "runs/xm", "Run directories go under <root>/<xid>/<wid>.")
_NPROC = flags.DEFINE_integer("nproc", None, "Processes per node (default: GPUs of the node, or 1).")
_PYTHON = flags.DEFINE_string("python", None, "Interpreter with flame_gin installed (local executor).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print each point's command line and launch nothing.")
# Slurm (xmanager-slurm): it runs container images over SSH on the cluster's login node.
_SLURM_CLUSTER = flags.DEFINE_string(
    "slurm_cluster",
    None,
    "Python path of a xm_slurm.SlurmClusterConfig (module:attribute), for instance my_clusters:narval.",
)
_SLURM_IMAGE = flags.DEFINE_string("slurm_image", None, "Container image with flame_gin installed.")
_NODES = flags.DEFINE_integer("nodes", 1, "Nodes per point (Slurm).")
_GPUS_PER_NODE = flags.DEFINE_integer("gpus_per_node", 8, "GPUs per node (Slurm).")
_TIME = flags.DEFINE_string("time", "24:00:00", "Time limit per job, HH:MM:SS (Slurm).")
_PARTITION = flags.DEFINE_string("partition", None, "Slurm partition.")


def split_values(text: str) -> list[str]:
    """Splits ``v1,v2`` on top-level commas (not inside brackets, parentheses or quotes)."""
    values, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    values.append("".join(current).strip())
    if quote or depth or any(not v for v in values):
        raise ValueError(f"--sweep: cannot split {text!r} into values (empty value or unbalanced brackets/quotes)")
    return values


def sweep_points(*, axes: list[str], common: list[str]) -> list[list[str]]:
    """The grid of ``--sweep`` axes, each point as its list of gin bindings (the common ones first)."""
    parsed = []
    for axis in axes:
        name, sep, values = axis.partition("=")
        if not sep or not name.strip() or not values.strip():
            raise ValueError(f"--sweep={axis!r}: expected NAME=v1,v2,...")
        parsed.append([f"{name.strip()} = {v}" for v in split_values(values)])
    return [list(common) + list(point) for point in itertools.product(*parsed)] if parsed else [list(common)]


def trainer_args(*, gin_files: list[str], bindings: list[str], workdir: str) -> list[str]:
    """The trainer's command-line arguments for one point."""
    return [f"--gin_file={f}" for f in gin_files] + [f"--gin_bindings={b}" for b in bindings] + [f"--workdir={workdir}"]


def _workdir(xid: int, wid: int) -> pathlib.Path:
    root = pathlib.Path(_WORKDIR_ROOT.value)
    return (root if root.is_absolute() else REPO / root) / str(xid) / str(wid)


def _check_gin_files() -> None:
    for f in _GIN_FILES.value:
        if not (pathlib.Path(f).exists() or (REPO / f).exists() or (REPO / "gin" / f).exists()):
            raise app.UsageError(f"--gin_file={f}: no such file (looked in the current folder, {REPO} and {REPO}/gin)")


def _launch_local(points: list[list[str]]) -> None:
    from xmanager import xm, xm_local

    python = _PYTHON.value or os.environ.get("FLAME_GIN_PYTHON") or "python3"
    env = {"FLAME_GIN_PYTHON": python}
    if _NPROC.value:
        env["NPROC"] = str(_NPROC.value)
    with xm_local.create_experiment(experiment_title=_TITLE.value) as experiment:
        [executable] = experiment.package(
            [xm.binary(path=str(REPO / "launch" / "local.sh"), executor_spec=xm_local.LocalSpec())]
        )
        for bindings in points:

            async def add_point(work_unit, bindings=bindings):
                workdir = _workdir(experiment.experiment_id, work_unit.work_unit_id)
                workdir.mkdir(parents=True, exist_ok=True)
                (workdir / "bindings.gin").write_text("\n".join(bindings) + "\n")
                args = trainer_args(gin_files=_GIN_FILES.value, bindings=bindings, workdir=str(workdir))
                print(f"work unit {work_unit.work_unit_id}: {workdir}: {' | '.join(bindings) or '(no bindings)'}")
                work_unit.add(xm.Job(executable=executable, executor=xm_local.Local(), args=args, env_vars=env))

            experiment.add(add_point)
        print(
            f"experiment {experiment.experiment_id}: {len(points)} work unit(s) under "
            f"{_workdir(experiment.experiment_id, 0).parent}"
        )


def slurm_executor(*, cluster):
    """xm_slurm executor: one task per node, SIGUSR2 90 s before the limit, requeue on the trainer's exit 42."""
    import datetime as dt

    import xm_slurm

    hours, minutes, seconds = (int(x) for x in _TIME.value.split(":"))
    return xm_slurm.Slurm(
        requirements=xm_slurm.JobRequirements(gpu=_GPUS_PER_NODE.value, replicas=_NODES.value, cluster=cluster),
        time=dt.timedelta(hours=hours, minutes=minutes, seconds=seconds),
        partition=_PARTITION.value,
        requeue=True,
        requeue_on_exit_code=42,
    )


def _launch_slurm(points: list[list[str]]) -> None:
    import importlib

    import xm_slurm
    from xmanager import xm

    if not (_SLURM_CLUSTER.value and _SLURM_IMAGE.value):
        raise app.UsageError("--executor=slurm needs --slurm_cluster=module:attribute and --slurm_image=IMAGE")
    module, _, attribute = _SLURM_CLUSTER.value.partition(":")
    cluster = getattr(importlib.import_module(module), attribute)
    with xm_slurm.create_experiment(experiment_title=_TITLE.value) as experiment:
        [executable] = experiment.package(
            [xm_slurm.docker_image(image=_SLURM_IMAGE.value, args=slurm_entrypoint_args())]
        )
        for bindings in points:

            async def add_point(work_unit, bindings=bindings):
                workdir = f"{_WORKDIR_ROOT.value}/{experiment.experiment_id}/{work_unit.work_unit_id}"
                work_unit.add(
                    xm.Job(
                        executable=executable,
                        executor=slurm_executor(cluster=cluster),
                        args=trainer_args(gin_files=_GIN_FILES.value, bindings=bindings, workdir=workdir),
                    )
                )

            experiment.add(add_point)


def slurm_entrypoint_args() -> list[str]:
    """The container's command: torchrun with a c10d rendezvous on the job's first node, from SLURM_* variables."""
    nproc = _NPROC.value or _GPUS_PER_NODE.value
    return [
        "bash",
        "-c",
        (
            'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1); '
            f"exec python -m torch.distributed.run --nnodes={_NODES.value} --nproc_per_node={nproc} "
            '--rdzv_backend=c10d --rdzv_endpoint="$head:$((20000 + SLURM_JOB_ID % 20000))" --rdzv_id="$SLURM_JOB_ID" '
            '-m flame_gin.train "$@"'
        ),
        "flame_gin",
    ]


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    _check_gin_files()
    try:
        points = sweep_points(axes=_SWEEP.value, common=_GIN_BINDINGS.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if _DRY_RUN.value:
        for i, bindings in enumerate(points, 1):
            args = trainer_args(gin_files=_GIN_FILES.value, bindings=bindings, workdir=str(_workdir(0, i)))
            print(shlex.join([str(REPO / "launch" / "local.sh"), *args]))
        return
    if _EXECUTOR.value == "local":
        _launch_local(points)
    else:
        _launch_slurm(points)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "launch"))
    app.run(main)
