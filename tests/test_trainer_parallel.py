"""The trainer on a 2-process gloo CPU mesh (torchrun, gin/parallel/ files, real data and checkpoints) against
single-process runs of the same global batch.

References: tensor, context and pipeline parallel read one data stream, so they must match the single-process
run step by step (context parallel also in varlen mode, against a single-process varlen run); FSDP reads two
streams (the loader splits documents by stream), so it must match the same two streams trained with
replicated parameters (DDP semantics: all-reduced gradients, no sharding). The FSDP and pipeline run
directories then resume in a single process. The learning rate is constant (no warm-up, cosine floor 1.0),
so shorter runs are prefixes of longer ones.

Start-up (imports) costs far more than a tiny step, so every 2-process run is made by one torchrun launch and
every single-process run by one more, each calling the trainer once per configuration with a fresh gin
config and process group (this file is also that worker); the results are shared by the tests.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # subprocess / multi-process runs: the full suite only

ROOT = pathlib.Path(__file__).resolve().parent.parent
REF_STEPS, PAR_STEPS = 4, 3
COMMON = [
    "--gin_file=gin/tiny.gin",
    "--gin.WARMUP_STEPS=0",
    "--gin.MIN_LR_RATIO=1.0",
    "--gin.BATCH_SIZE=4",
    "--gin.SEQ_LEN=64",
    "--gin.flame_gin.run.log_interval=1",
    "--gin.flame_gin.evaluation.interval=0",
    "--gin.CHECKPOINT_INTERVAL=1000",
]
VARLEN = ["--gin_file=gin/data/varlen.gin", "--gin.CONTEXT_LEN=24"]
FP32 = "--gin_bindings=parallelize.param_dtype = 'float32'"
RUN_SETTINGS = [
    "--gin.flame_gin.run.init_timeout_seconds=120",
    "--gin.flame_gin.run.train_timeout_seconds=60",
    "--gin.flame_gin.run.nccl_trace_buffer_size=2000",
]
# The primary's metric line: "[step] ..., loss=6.24355, ..." (6 significant digits).
LOSS = re.compile(r"\[(\d+)\] [^\n]*?\bloss=([0-9.e+-]+)")
MARK = "=== run "

PARALLEL = {  # name: (steps, extra arguments), run in this order by one torchrun launch
    "ddp": (PAR_STEPS, ["--gin_file=gin/parallel/ddp.gin"]),
    # Host reads of tensors per step: the fused AdamW (as on a GPU) skips bad steps on the device; logging
    # only at the last step; one stop signal on rank 1 after step 3 (the 2-rank stop vote).
    "ddp_host_reads": (
        6,
        [
            "--gin_file=gin/parallel/ddp.gin",
            "--gin.flame_gin.run.log_interval=1000",
            "--gin_bindings=flame_gin.adamw.fused = True",
        ],
    ),
    "fsdp": (PAR_STEPS, ["--gin_file=gin/parallel/fsdp.gin", FP32]),
    "tp": (PAR_STEPS, ["--gin_file=gin/parallel/tp2.gin", FP32, *RUN_SETTINGS]),
    "cp": (PAR_STEPS, ["--gin_file=gin/parallel/cp2.gin", FP32]),
    "cp_varlen": (PAR_STEPS, [*VARLEN, "--gin_file=gin/parallel/cp2.gin", FP32]),
    "pp": (PAR_STEPS, ["--gin_file=gin/parallel/pp2.gin", FP32, "--gin.build_pipeline.microbatches=2"]),
    "pp_interleaved": (
        PAR_STEPS,
        [
            "--gin.NUM_LAYERS=4",
            "--gin_file=gin/parallel/pp2_interleaved.gin",
            FP32,
            "--gin.build_pipeline.microbatches=4",
        ],
    ),
}
SINGLE = {  # run after the parallel runs; "resume_*" continue the parallel run directories
    "reference": (REF_STEPS, []),
    "varlen": (PAR_STEPS, VARLEN),
    "resume_fsdp": (REF_STEPS, []),
    "resume_pp": (REF_STEPS, []),
    "reference_4_blocks": (REF_STEPS, ["--gin.NUM_LAYERS=4"]),
    "resume_pp_interleaved": (REF_STEPS, ["--gin.NUM_LAYERS=4"]),
}
ONE_RANK = {  # torchrun with one process: a one-rank process group and mesh
    "fsdp_one_rank": (REF_STEPS, ["--gin_file=gin/parallel/fsdp_one_gpu.gin", FP32]),
    "fsdp_one_rank_offload": (
        REF_STEPS,
        ["--gin_file=gin/parallel/fsdp_one_gpu.gin", FP32, "--gin.flame_gin.parallelize.cpu_offload=True"],
    ),
}


def _start(*, specs: list[dict], procs: int, log: pathlib.Path, torchrun: bool = False, nice: int = 0):
    """Starts ``specs`` in one launch (its output to ``log``); :func:`_finish` collects it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    worker = [str(pathlib.Path(__file__).resolve()), json.dumps(specs)]
    cmd = (
        [sys.executable, *worker]
        if procs == 1 and not torchrun
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *worker]
    )
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=out,
            text=True,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )
    return proc, log, specs


def _finish(launch) -> dict[str, tuple[dict, str]]:
    """Waits for a launch; returns name -> ({step: loss} of the primary, that run's log)."""
    proc, log, specs = launch
    proc.wait(timeout=300)
    stderr = log.read_text(errors="replace")
    assert proc.returncode == 0, stderr[-6000:]
    results = {}
    for chunk in stderr.split(MARK)[1:]:
        name, _, text = chunk.partition("\n")
        results[name.strip()] = ({int(m.group(1)): float(m.group(2)) for m in LOSS.finditer(text)}, text)
    assert sorted(results) == sorted(s["name"] for s in specs), stderr[-4000:]
    return results


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def runs(runs_root, tmp_path_factory):
    """The three launches start at once (most of each is imports on one core). The single-process launch runs
    its own references first and waits for the 2-process launch to have finished before its first "resume_*"
    run, which continues a run directory of that launch."""
    root, logs = runs_root, tmp_path_factory.mktemp("logs")
    parallel_done = logs / "parallel_done"
    spec = lambda name, steps, extra, workdir=None: dict(
        name=name, args=[*COMMON, f"--gin.TRAIN_STEPS={steps}", *extra], workdir=str(root / (workdir or name))
    )
    single_specs = [spec(n, *v, workdir=n.replace("resume_", "")) for n, v in SINGLE.items()]
    next(s for s in single_specs if s["name"].startswith("resume_"))["wait_for"] = str(parallel_done)
    launches = [
        _start(specs=[spec(n, *v) for n, v in PARALLEL.items()], procs=2, log=logs / "parallel.log"),
        _start(specs=single_specs, procs=1, log=logs / "single.log"),
        _start(
            specs=[spec(n, *v) for n, v in ONE_RANK.items()], procs=1, torchrun=True, log=logs / "one_rank.log", nice=10
        ),
    ]
    try:
        out = _finish(launches[0])
        parallel_done.write_text("ok")
        for launch in launches[1:]:
            out.update(_finish(launch))
    except BaseException:
        for proc, _, _ in launches:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        raise
    return out


def assert_close(got, want, steps, rtol=1e-4):
    assert sorted(got) == list(steps), (got, list(steps))
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=rtol), (step, got[step], want[step])


def test_reference_learns(runs):
    losses, log = runs["reference"]
    assert sorted(losses) == list(range(1, REF_STEPS + 1))
    assert losses[REF_STEPS] < losses[1]
    assert "memory estimate per rank (GiB): params=" in log


def test_fsdp_matches_replicated_then_resumes_in_one_process(runs):
    replicated, log = runs["ddp"]
    assert "dp_replicate=2 dp_shard=1" in log
    losses, log = runs["fsdp"]
    assert "dp_replicate=1 dp_shard=2" in log
    assert_close(losses, replicated, range(1, PAR_STEPS + 1))
    # (Its initial weights are the single process's: FSDP on one rank matches the plain run below, and the
    # tensor, context and pipeline runs on two ranks match it step by step. Its first loss is not compared with
    # the plain run's: the two read other batches, which moves the loss by ~0.2% at GLA's initialisation.)
    # the 2-rank sharded checkpoint (weights, optimizer, both data streams) resumes in a single process
    resumed, log = runs["resume_fsdp"]
    assert f"resumed from step {PAR_STEPS}" in log
    assert sorted(resumed) == list(range(PAR_STEPS + 1, REF_STEPS + 1))
    assert all(abs(resumed[s] - losses[PAR_STEPS]) < 0.2 for s in resumed), (resumed, losses)


def test_fsdp_on_one_rank_shards_and_matches_the_plain_run(runs):
    losses, log = runs["fsdp_one_rank"]
    assert "data parallel: fsdp over ('dp_shard_cp',) (1 ranks)" in log
    assert_close(losses, runs["reference"][0], range(1, REF_STEPS + 1), rtol=1e-5)


def test_cpu_offload_on_one_rank_trains_as_the_plain_run(runs):
    # FSDP's offload policy keeps parameters, gradients and AdamW states on the host (unpinned on a CPU-only
    # machine, where pinning needs a GPU); the losses are the plain run's.
    losses, log = runs["fsdp_one_rank_offload"]
    assert "(1 ranks)" in log and "optimizer states kept on the host (FSDP's offload)" in log
    assert_close(losses, runs["reference"][0], range(1, REF_STEPS + 1), rtol=1e-5)


def test_tensor_parallel_matches_single_process_under_run_timeouts(runs):
    losses, log = runs["tp"]
    assert "tp=2" in log and "data streams=1" in log
    assert_close(losses, runs["reference"][0], range(1, PAR_STEPS + 1))


def test_context_parallel_matches_single_process(runs):
    losses, log = runs["cp"]
    assert "cp=2" in log and "data streams=1" in log
    assert_close(losses, runs["reference"][0], range(1, PAR_STEPS + 1))


def test_context_parallel_varlen_matches_single_process_varlen(runs):
    losses, log = runs["cp_varlen"]
    assert "cp=2" in log
    assert_close(losses, runs["varlen"][0], range(1, PAR_STEPS + 1))
    assert losses != runs["cp"][0]  # documents really were cut


def test_pipeline_parallel_matches_single_process_then_resumes_in_one_process(runs, runs_root):
    losses, log = runs["pp"]
    assert "pp=2" in log and "data streams=1" in log
    assert_close(losses, runs["reference"][0], range(1, PAR_STEPS + 1))
    # each stage wrote its own arrays under the unsplit model's names: the run goes on in one process, exactly
    resumed, log = runs["resume_pp"]
    assert f"resumed from step {PAR_STEPS}" in log
    assert_close(resumed, runs["reference"][0], range(PAR_STEPS + 1, REF_STEPS + 1))
    # Orbax's tree metadata of the pipelined checkpoint lists every array of both stages, as an unsplit run's does.
    tree = lambda run: set(
        json.loads((runs_root / run / "checkpoints" / str(PAR_STEPS) / "model" / "_METADATA").read_text())[
            "tree_metadata"
        ]
    )
    assert tree("pp") == tree("fsdp") and len(tree("pp")) > 30


def test_interleaved_pipeline_two_stages_per_rank_matches_single_process_then_resumes(runs):
    losses, log = runs["pp_interleaved"]
    assert "pp=2" in log
    reference = runs["reference_4_blocks"][0]
    assert_close(losses, reference, range(1, PAR_STEPS + 1))
    resumed, log = runs["resume_pp_interleaved"]
    assert f"resumed from step {PAR_STEPS}" in log
    assert_close(resumed, reference, range(PAR_STEPS + 1, REF_STEPS + 1))


def test_no_host_reads_outside_logging_and_saving_steps_and_the_stop_vote_agrees(runs):
    """Each step on a 2-rank mesh reads no tensor back to the host (``.item()``, ``bool``, ``float``, ``int``,
    ``.tolist()``) and makes none from host data on the device (``torch.tensor(..., device=)``, whose copy waits
    for the GPU's stream) outside the logging/saving step; the stop asked of rank 1
    alone after step 3 stops both ranks after step 4 with the requeue code."""
    _, text = runs["ddp_host_reads"]
    reads = json.loads(re.search(r"HOST_READS (\{.*\})", text).group(1))
    assert reads["status"] == 42 and reads["last_step"] == 4, reads
    assert [reads["per_step"][str(s)] for s in (1, 2, 3)] == [0, 0, 0], reads  # step 4 votes, saves, leaves


def _worker(specs: list[dict]) -> None:
    """Each spec: the command line's gin arguments and a run directory; the trainer runs once per spec.

    The process group outlives the runs (a run's shutdown passes its barrier but leaves the group to the next
    run; it is destroyed after the last), as the runs of one launch share the processes.
    """
    import torch.distributed as dist

    from flame_gin import config as config_lib
    from flame_gin import configurables, process

    process.shutdown = lambda: dist.barrier() if dist.is_initialized() else None
    for spec in specs:
        if "wait_for" in spec:  # a file the test writes once the runs this one continues have finished
            deadline = time.monotonic() + 300
            while not os.path.exists(spec["wait_for"]):
                assert time.monotonic() < deadline, f"{spec['name']}: {spec['wait_for']} never appeared"
                time.sleep(0.1)
        argv = config_lib.rewrite_shorthand(spec["args"])
        files = [a.split("=", 1)[1] for a in argv if a.startswith("--gin_file=")]
        bindings = [a.split("=", 1)[1] for a in argv if a.startswith("--gin_bindings=")]
        config_lib.parse(
            gin_files=files,
            gin_bindings=[*bindings, f"MODEL_DIR = {spec['workdir']!r}"],
            search_paths=config_lib.default_search_paths(),
        )
        if os.environ.get("RANK", "0") == "0":
            print(f"{MARK}{spec['name']}", file=sys.stderr, flush=True)
        if spec["name"] == "ddp_host_reads":
            _count_host_reads()
            continue
        assert configurables.run(config_text=config_lib.config_text()) == 0, spec["name"]
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _count_host_reads() -> None:
    """Runs the trainer counting, per step, the calls that read a tensor back to the host; rank 1 asks to stop
    after step 3. Rank 0 prints the counts as one JSON line."""
    import torch

    from flame_gin import config as config_lib
    from flame_gin import configurables, steps

    counts, step = {}, [0]
    names = ("item", "__bool__", "__float__", "__int__", "tolist")
    originals = {name: getattr(torch.Tensor, name) for name in names}
    fetch, tensor = steps.fetch, torch.tensor

    def counting(name):
        def read(self, *args, **kwargs):
            counts[step[0]] = counts.get(step[0], 0) + 1
            return originals[name](self, *args, **kwargs)

        return read

    def made_on_a_device(*args, **kwargs):  # host data copied to a device: on a GPU that copy waits for the stream
        if kwargs.get("device") is not None:
            counts[step[0]] = counts.get(step[0], 0) + 1
        return tensor(*args, **kwargs)

    def next_step(*args, **kwargs):
        step[0] += 1
        return fetch(*args, **kwargs)

    for name in names:
        setattr(torch.Tensor, name, counting(name))
    steps.fetch, torch.tensor = next_step, made_on_a_device
    try:
        status = configurables.run(
            config_text=config_lib.config_text(), stop_requested=lambda: os.environ["RANK"] == "1" and step[0] >= 3
        )
    finally:
        for name in names:
            setattr(torch.Tensor, name, originals[name])
        steps.fetch, torch.tensor = fetch, tensor
    if os.environ.get("RANK", "0") == "0":
        print(
            "HOST_READS "
            + json.dumps(
                {
                    "status": status,
                    "last_step": step[0],
                    "per_step": {s: counts.get(s, 0) for s in range(1, step[0] + 1)},
                }
            ),
            file=sys.stderr,
            flush=True,
        )


if __name__ == "__main__":
    from absl import logging as absl_logging

    absl_logging.use_absl_handler()
    absl_logging.set_verbosity(absl_logging.INFO)
    sys.path.remove(str(pathlib.Path(__file__).resolve().parent))  # the tests folder must not shadow packages
    _worker(json.loads(sys.argv[1]))
