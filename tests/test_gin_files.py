"""No shipped config can rot: every top-level experiment file parses, builds at a tiny size and exits.

Each ``gin/*.gin`` runs through the real command line for 0 steps with the embedded data layered on top (the
real sources need network) and the model shrunk through its macros; the run must validate, build the data
pipeline and the model, and exit 0. Every gin file also opens with the command that runs it.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOP_LEVEL = sorted(
    p.name for p in (ROOT / "gin").glob("*.gin") if p.name not in ("base.gin", "pretrain.gin")
)  # experiments
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
    "--gin.flame_gin.evaluation.interval=0",
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
        "--gin.flame_gin.evaluation.interval=0",
        "--gin.flame_gin.run.log_interval=1",
        f"--workdir={workdir}",
    ]


# Runs each case through the command's own main (flags, the --gin.X=V shorthand, parsing, the run) in one
# process: the libraries are imported once, not once per case. Prints one JSON line per case.
_RUNNER = """
import json, logging, sys
from absl import flags, logging as absl_logging
from flame_gin import config as config_lib, train

lines = []
handler = logging.Handler()
handler.emit = lambda record: lines.append(record.getMessage())
absl_logging.get_absl_logger().addHandler(handler)
for key, argv in json.loads(sys.argv[1]):
    lines.clear()
    flags.FLAGS.unparse_flags()
    flags.FLAGS(config_lib.rewrite_shorthand(["flame_gin.train", *argv]))
    absl_logging.set_verbosity(absl_logging.INFO)  # parsing the flags set absl's default (warnings)
    status = train.main(["flame_gin.train"])
    print(json.dumps({"key": key, "status": status, "logged": "\\n".join(lines)}), flush=True)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every dry run and ablation run, in one subprocess (``_RUNNER``). Maps (kind, name) to (workdir, exit
    status, what the run logged)."""
    base = tmp_path_factory.mktemp("gin_runs")
    cases = [("top", n, _dry_run_args) for n in TOP_LEVEL] + [("ablation", n, _ablation_args) for n in ABLATIONS]
    workdirs = {(kind, name): base / kind / name / "w" for kind, name, _ in cases}
    argvs = [[[kind, name], make_args(name, workdirs[kind, name])] for kind, name, make_args in cases]
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(argvs, default=str)],
        cwd=ROOT,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(cases), proc.stderr[-3000:]
    return {tuple(r["key"]): (workdirs[tuple(r["key"])], r["status"], r["logged"]) for r in results}


@pytest.mark.slow  # a few seconds each
@pytest.mark.parametrize("name", TOP_LEVEL)
def test_top_level_gin_file_dry_runs(name, runs):
    workdir, status, logged = runs["top", name]
    assert status == 0, logged[-3000:]
    assert "parameters" in logged and (workdir / "config.gin").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ABLATIONS)
def test_ablation_layers_over_the_tiny_experiment(name, runs):
    _, status, logged = runs["ablation", name]
    assert status == 0, logged[-3000:]
    assert "step 1/1" in logged


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


def _header_command(path: pathlib.Path) -> str:
    """The command in a gin file's opening comment, its continuation lines joined."""
    lines = path.read_text().splitlines()[:8]
    for i, line in enumerate(lines):
        start = max(line.find("python -m flame_gin.train"), line.find("torchrun"))
        if start >= 0:
            command = line[start:]
            while command.rstrip().endswith("\\"):
                i += 1
                command = command.rstrip()[:-1] + " " + lines[i].lstrip("#").strip()
            return command
    raise AssertionError(f"{path}: no command in its header")


HEADERS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "gin").rglob("*.gin"))


@pytest.mark.parametrize("name", HEADERS)
def test_header_command_binds_a_whole_run(name):
    """Each header's command, in dry-run form: its gin files and bindings parse together, bind everything
    ``flame_gin.run`` needs (data included: a size file alone binds none) and name a model family. Layering
    and data are what a header can get wrong; every size file builds in tests/test_model_zoo.py, and training
    is proved by the dry runs above and the tiny-run tests."""
    import gin
    from flame_gin import config as config_lib
    from flame_gin import configurables  # noqa: F401  (registers the configurables)

    command = _header_command(ROOT / name).split()
    files = [a.split("=", 1)[1] for a in command if a.startswith("--gin_file=")]
    included = name.removeprefix("gin/")  # a family or base file is used through the file its command names
    assert name in files or any(f"include '{included}'" in (ROOT / f).read_text() for f in files), name
    bindings = [a[len("--gin.") :].replace("=", " = ", 1) for a in command if a.startswith("--gin.")]
    config_lib.parse(
        gin_files=[str(ROOT / f) for f in files],
        gin_bindings=[*bindings, "MODEL_DIR = '/tmp/unused'"],
        search_paths=config_lib.default_search_paths(),
    )
    for needed in (
        "run.train_data",
        "run.model_config",
        "run.train_steps",
        "run.batch_size",
        "run.seq_len",
        "run.optimizer",
        "adamw.lr",
        "run.lr_schedule",
    ):
        assert gin.query_parameter(f"flame_gin.{needed}") is not None, f"{name}: flame_gin.{needed}"
    assert gin.query_parameter("flame_gin.model_config.family"), f"{name}: no model family"
    # FSDP on one rank needs torchrun's process group; a plain `python -m` of such a header is refused at start
    one_rank = config_lib.bound_value("flame_gin.parallelize.fsdp_on_one_rank", default=False)
    assert not one_rank or command[0] == "torchrun", f"{name}: fsdp_on_one_rank needs torchrun --nproc_per_node=1"
