"""A run that runs out of device memory ends with one message (step, micro-batch, ways out) and loses nothing
it had done: the save in flight is committed and the metrics written so far are readable.

The error is raised where a GPU raises it (inside a training step, or in the evaluation after one) by wrapping
the step functions: a CPU cannot run out of device memory on purpose.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator

from flame_gin import config as config_lib
from flame_gin import configurables, steps
from flame_gin.checkpoint import layout
from flame_gin.out_of_memory import OutOfDeviceMemory

ROOT = pathlib.Path(__file__).resolve().parent.parent
TORCH_SAYS = "CUDA out of memory. Tried to allocate 1.95 GiB. GPU 0 has a total capacity of 79.18 GiB"
BINDINGS = [
    "TRAIN_STEPS = 6",
    "WARMUP_STEPS = 0",
    "CHECKPOINT_INTERVAL = 2",
    "flame_gin.run.log_interval = 1",
    "flame_gin.evaluation.interval = 2",
    "flame_gin.evaluation.batches = 1",
]


def _failing_on_call(function, call: int):
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise torch.OutOfMemoryError(TORCH_SAYS + "\nOf the allocated memory 73.28 GiB is allocated by PyTorch")
        return function(*args, **kwargs)

    return wrapped


def _run(*, workdir, gin_files=(), bindings=()):
    config_lib.parse(
        gin_files=["gin/tiny.gin", *gin_files],
        gin_bindings=[f"MODEL_DIR = {str(workdir)!r}", *BINDINGS, *bindings],
        search_paths=config_lib.default_search_paths(),
    )
    return configurables.run(config_text="", on_first_step=None, stop_requested=None)


def test_a_step_out_of_memory_names_the_step_and_keeps_the_save_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setattr(steps, "forward_backward", _failing_on_call(steps.forward_backward, call=3))
    with pytest.raises(OutOfDeviceMemory) as raised:
        _run(workdir=tmp_path)
    message = str(raised.value).splitlines()[0]  # gin appends the configurable's name on a line of its own
    assert message.startswith(
        f"out of device memory in step 3 (micro-batch 8 x 128 tokens, no block(s) checkpointed): {TORCH_SAYS}."
    )
    assert "--gin_file=gin/parallel/checkpointing.gin" in message  # no block recomputes yet: the first way out
    assert "--gin.flame_gin.run.grad_accum_steps=2" in message
    assert message.endswith(
        "The newest committed checkpoint is step 2: the same command with one of these settings resumes from it."
    )
    assert layout.committed_steps(tmp_path / "checkpoints") == [2]  # the save in flight at the failure, committed
    board = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    assert [event.step for event in board.Scalars("loss")] == [1, 2]
    assert [event.step for event in board.Scalars("eval_loss")] == [2]


def test_an_evaluation_out_of_memory_is_placed_after_its_step_and_knows_the_blocks_recompute(tmp_path, monkeypatch):
    monkeypatch.setattr(steps, "evaluate", _failing_on_call(steps.evaluate, call=2))  # the evaluation of step 4
    with pytest.raises(OutOfDeviceMemory) as raised:
        _run(workdir=tmp_path, gin_files=["gin/parallel/checkpointing.gin"])
    message = str(raised.value).splitlines()[0]  # gin appends the configurable's name on a line of its own
    assert message.startswith(
        "out of device memory after step 4 (logging, evaluation or checkpointing) (micro-batch 8 x 128 tokens, "
        "2 block(s) checkpointed)"
    )
    assert "checkpointing.gin" not in message  # already recomputing every block
    assert message.endswith(
        "The newest committed checkpoint is step 2: the same command with one of these settings resumes from it."
    )  # step 4's save comes after its evaluation


_CLI = """
import sys, torch
from flame_gin import steps, train
real, calls = steps.forward_backward, []
def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.95 GiB.")
    return real(*args, **kwargs)
steps.forward_backward = failing
sys.argv = ["flame_gin", *sys.argv[1:]]
train.run_main()
"""


@pytest.mark.slow
def test_the_command_line_prints_one_message_and_exits_1(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _CLI, "--gin_file=gin/tiny.gin", f"--workdir={tmp_path}"]
        + [f"--gin.{b.replace(' = ', '=')}" for b in BINDINGS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if line.startswith("flame_gin: ")]
    assert len(said) == 1 and said[0].startswith("flame_gin: out of device memory in step 2 (micro-batch 8 x 128")
    assert said[0].endswith("No checkpoint was committed.")
    assert "1.95 GiB. What lowers memory" in said[0]  # torch's own full stop, not doubled
    assert proc.stderr.rstrip().endswith(said[0])  # the last thing printed, nothing after it


def test_a_first_step_near_the_device_limit_is_warned_about_with_the_ways_out():
    """RWKV-7-340M at 16 x 2048 peaked at 75.2 of an H100's 79.2 GiB: the run goes on, but the user is told, with
    the settings that lower memory; at 37 GiB (GLA-340M compiled) nothing is said."""
    from flame_gin.out_of_memory import headroom_warning

    near = headroom_warning(peak_gib=75.23, capacity_gib=79.18, checkpointed=0, micro_batch=16, grad_accum_steps=1)
    assert near.startswith("the first step's peak allocation is 75.2 GiB of the device's 79.2 GiB (95%)")
    assert "--gin_file=gin/parallel/checkpointing.gin" in near and "grad_accum_steps=2" in near
    checkpointed = headroom_warning(
        peak_gib=75.0, capacity_gib=79.18, checkpointed=24, micro_batch=1, grad_accum_steps=1
    )
    assert "checkpointing.gin" not in checkpointed and "grad_accum_steps" not in checkpointed  # neither applies
    assert "gin/parallel/fsdp.gin" in checkpointed
    assert (
        headroom_warning(peak_gib=37.03, capacity_gib=79.18, checkpointed=0, micro_batch=16, grad_accum_steps=1) is None
    )


def _losses(workdir) -> dict[int, float]:
    board = event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
    board.Reload()
    return {event.step: event.value for event in board.Scalars("loss")}


@pytest.mark.parametrize(
    "gin_files, bindings",
    [(["gin/parallel/checkpointing.gin"], []), ([], ["flame_gin.run.grad_accum_steps = 2"])],
    ids=["every_block_recomputed", "half_the_micro_batch"],
)
def test_each_way_out_resumes_the_same_run(tmp_path, monkeypatch, gin_files, bindings):
    """The user's path after the message: the same command with one of the settings it names. The run resumes
    from the newest committed checkpoint and continues as the uninterrupted run would have (float32 on a CPU:
    recomputation changes nothing; two micro-batches of 4 sum what one of 8 does, up to rounding)."""
    _run(workdir=tmp_path / "straight")
    with monkeypatch.context() as patch:
        patch.setattr(steps, "forward_backward", _failing_on_call(steps.forward_backward, call=5))
        with pytest.raises(OutOfDeviceMemory, match="in step 5 .* The newest committed checkpoint is step 4"):
            _run(workdir=tmp_path / "resumed")
    _run(workdir=tmp_path / "resumed", gin_files=gin_files, bindings=bindings)
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4, 5, 6]
    assert [resumed[s] for s in (5, 6)] == pytest.approx([straight[s] for s in (5, 6)], rel=1e-6)
