"""CPU smoke test of benchmarks/throughput.py at a tiny size: it trains both loops and prints a sound JSON line."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = [
    "NUM_LAYERS=1",
    "HIDDEN_SIZE=32",
    "NUM_HEADS=2",
    "VOCAB_SIZE=256",
    "INTERMEDIATE_SIZE=64",
    "SEQ_LEN=32",
    "BATCH_SIZE=2",
]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_benchmark_varlen_json_line(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    out = tmp_path / "lines.jsonl"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "throughput.py"),
        "--gin_file=gin/gla.gin",
        "--steps=3",
        "--warmup=1",
        f"--json_out={out}",
        "--label=smoke",
        "--baseline_ac",  # the hand loop recomputing its blocks, as it must for GLA-1B at 16 x 2048
        "--gin_bindings=flame_gin.run.varlen=True",
        *[f"--gin_bindings={b}" for b in TINY],
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=110, env={**os.environ, "JAX_PLATFORMS": "cpu"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line == json.loads(out.read_text().splitlines()[-1])
    assert (line["family"], line["batch"], line["seq_len"], line["varlen"]) == ("gla", 2, 32, True)
    assert line["baseline_ac"] is True
    assert line["flame_gin"]["tokens_per_second"] > 0 and line["baseline"]["tokens_per_second"] > 0
    assert line["ratio"] == pytest.approx(
        line["flame_gin"]["tokens_per_second"] / line["baseline"]["tokens_per_second"], rel=1e-2
    )
    assert line["flops_per_token"] > 0
    # the process's peak resident set: at least the imported torch, below this machine's memory
    import psutil

    assert 0.2 < line["host_peak_gib"] < psutil.virtual_memory().total / 2**30
    progress = [ln for ln in proc.stderr.splitlines() if ln.startswith("hand loop: ")]
    assert progress[0].startswith("hand loop: model built on cpu") and progress[-1].startswith("hand loop: step 3/3")
    # Both loops learn something real from the same synthetic data (vocabulary 256: ln 256 ~ 5.55 at the start).
    for loop in ("flame_gin", "baseline"):
        assert 4.0 < line[loop]["final_loss"] < 6.5


def test_a_binding_that_changes_nothing_stops_the_benchmark_before_it_measures():
    """No gin/parallel/ file binds flame_gin.run.parallelize, so this binding would leave the blocks unchecked
    while the figure claims checkpointing."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "throughput.py"),
            "--gin_file=gin/gla.gin",
            "--gin_bindings=flame_gin.parallelize.activation_checkpointing = 'full'",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "throughput: gin binding(s) that this run never applies: flame_gin.parallelize.activation_checkpointing" in (
        proc.stderr
    )


def test_synthetic_varlen_batches_are_sound():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import hand_loop

    loader = hand_loop.SyntheticLoader(vocab_size=50, seq_len=16, batch_size=3, seed=0, varlen=True, distinct=2)
    batch = next(loader)
    ids, labels, cu = batch["input_ids"], batch["labels"], batch["cu_seqlens"].long()
    assert ids.shape == labels.shape == (1, 48) and int(cu[0]) == 0 and int(cu[-1]) == 48
    assert int((cu[1:] - cu[:-1]).max()) <= 16 and bool((ids >= 0).all()) and bool((ids < 50).all())
    ends = cu[1:] - 1
    assert bool((labels[0, ends] == -100).all())
    inside = [i for i in range(47) if i not in set(ends.tolist())]
    assert bool((labels[0, inside] == ids[0, [i + 1 for i in inside]]).all())
    assert next(loader)["input_ids"] is not ids and next(loader)["input_ids"] is ids  # cycles over 2 batches
    assert hand_loop.steady_rate(times={2: 1.0, 6: 3.0}, warmup=2, steps=6, tokens_per_step=10) == 20.0


def test_synthetic_varlen_document_lengths_do_not_grow_with_the_context():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import hand_loop

    for seq_len, batch in ((64, 16), (256, 4)):
        loader = hand_loop.SyntheticLoader(
            vocab_size=50, seq_len=seq_len, batch_size=batch, seed=0, varlen=True, distinct=1, doc_tokens=40
        )
        lengths = (lambda cu: cu[1:] - cu[:-1])(next(loader)["cu_seqlens"].long())
        assert int(lengths.sum()) == 1024 and int(lengths[:-1].min()) >= 20 and int(lengths.max()) <= 60
        assert 30 <= float(lengths[:-1].float().mean()) <= 50  # about doc_tokens at either context length


def test_fused_loss_mode_is_checked_before_any_kernel():
    import torch

    from flame_gin import loss

    assert loss.DEFAULT_FUSED in loss.MODES
    with pytest.raises(ValueError, match="'chunked'"):
        loss.fla_token_loss_sum(
            hidden=torch.zeros(2, 4),
            head=torch.nn.Linear(4, 8),
            labels=torch.zeros(2, dtype=torch.long),
            mode="chunked",
        )


def test_compiled_short_conv_saves_one_input_copy_for_backward():
    """The shifted-sum convolution keeps one padded copy of its input for the backward, not one per lag (the
    second form cost compiled DeltaNet-340M about 13 GiB at 16 x 2048)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import saved_activations

    from flame_gin.kernels import conv

    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(64, 4))

        def forward(self, x):
            return conv.causal_conv1d(x=x, weight=self.weight, activation="silu")[0]

    torch._dynamo.reset()
    rows = saved_activations.saved_tensors(Conv(), tokens=256, hidden=64)
    input_sized = [r for r in rows if r[2][-1] == 64 and r[2][-2] >= 256]  # [.., T (+ padding), D] tensors
    assert len(input_sized) <= 2, rows  # the block's output and one padded input copy


# The hand loop's settings in the in-process tests: 3 steps of a tiny model on the CPU.
HAND_LOOP = dict(
    device=torch.device("cpu"), steps=3, warmup=1, lr=1e-3, weight_decay=0.1, max_grad_norm=1.0, syncs=False
)


def test_the_hand_loop_recomputes_every_block_with_baseline_ac(monkeypatch):
    """`--baseline_ac` must make the reference loop checkpoint its blocks (else its figure at GLA-1B 16 x 2048
    would be an out-of-memory, or a loop other than the one compared): each block then runs its forward twice
    per step, once more in the backward; the losses are the same."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import hand_loop
    import transformers
    from fla.models import GLAConfig

    import flame_gin.kernels

    flame_gin.kernels.select(mode="reference")
    config = GLAConfig(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=50, intermediate_size=64)
    build, calls = transformers.AutoModelForCausalLM.from_config, []

    def counted(cfg):
        model = build(cfg)
        for block in model.model.layers:
            block.register_forward_pre_hook(lambda *_: calls.append(1))  # recomputation stops early: no post hook
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", counted)
    losses = []
    for checkpointing, forwards in ((False, 2 * 3), (True, 2 * 2 * 3)):
        calls.clear()
        loader = hand_loop.SyntheticLoader(vocab_size=50, seq_len=16, batch_size=2, seed=0, varlen=False)
        result = hand_loop.run_baseline(config=config, loader=loader, checkpointing=checkpointing, **HAND_LOOP)
        assert len(calls) == forwards, (checkpointing, len(calls))
        losses.append(result["final_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_a_hand_loop_out_of_memory_is_a_result_and_its_model_is_freed(monkeypatch, capsys):
    """RWKV-7-340M's plain loop ran out of memory at its second step on an 80 GB H100, which ended the whole
    benchmark before the trainer was measured. The error is now the baseline's result, and the loop's model
    is gone (not held by the exception's frames) when the trainer starts."""
    import gc
    import weakref

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import hand_loop
    import transformers
    from fla.models import GLAConfig

    import flame_gin.kernels

    flame_gin.kernels.select(mode="reference")
    config = GLAConfig(hidden_size=32, num_hidden_layers=1, num_heads=2, vocab_size=50, intermediate_size=64)
    build, models, calls = transformers.AutoModelForCausalLM.from_config, [], []

    def failing_at_step_two(cfg):
        model = build(cfg)
        models.append(weakref.ref(model))

        def forward_hook(*_):
            calls.append(1)
            if len(calls) == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.95 GiB.\nmore detail")

        model.model.layers[0].register_forward_pre_hook(forward_hook)
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", failing_at_step_two)
    loader = hand_loop.SyntheticLoader(vocab_size=50, seq_len=16, batch_size=2, seed=0, varlen=False)
    result = hand_loop.run_baseline_or_oom(config=config, loader=loader, **HAND_LOOP)
    assert result == {"out_of_memory": "CUDA out of memory. Tried to allocate 1.95 GiB."}
    assert "hand loop: out of memory: CUDA out of memory" in capsys.readouterr().err
    gc.collect()
    assert models[0]() is None  # the loop's model was released


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stream_dtype", ["float32", "bfloat16"])
def test_saved_activations_command_runs_and_its_json_line_adds_up(stream_dtype):
    """The script's own command, at a tiny size: it parses the experiment's gin files (which needs the
    configurables registered), partitions one compiled block and prints one sound JSON line last; the block's
    input is saved in the residual stream's dtype."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "saved_activations.py"),
            "--gin_file=gin/gla.gin",
            "--tokens=64",
            f"--stream_dtype={stream_dtype}",
            "--top=100",
            *[f"--gin_bindings={b}" for b in TINY],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (line["family"], line["tokens"], line["batch"], line["seq_len"], line["layers"]) == ("gla", 64, 2, 32, 1)
    assert line["stream_dtype"] == stream_dtype and line["saved_tensors"] > 0 and line["mib_per_block"] > 0
    # the per-block total at `tokens` is the fixed part plus the part that grows with tokens
    assert line["mib_per_block"] == pytest.approx(
        line["fixed_mib_per_block"] + 64 * line["mib_per_token_per_block"], abs=0.02
    )
    block_input = [row for row in proc.stdout.splitlines() if row.rstrip().endswith(" primals_2")]
    assert len(block_input) == 1 and f"torch.{stream_dtype}" in block_input[0], proc.stdout[-2000:]


def test_step_profile_reads_the_experiment_config_before_it_needs_a_gpu():
    """The profile's command parses the experiment's gin files (the configurables must be registered first:
    an import once missing made it stop at `flame_gin.run`), builds the model config, and only then asks for
    the GPU it profiles on."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_profile.py"), "--gin_file=gin/gla.gin", "--steps=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "step_profile: profiling the gla hand loop (16 x 2048) needs a CUDA GPU" in proc.stderr


_OOM_BENCH = """
import runpy, sys, torch
sys.path.insert(0, "benchmarks")
import hand_loop
def out_of_memory(**kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.95 GiB.\\nmore")
hand_loop.run_baseline = out_of_memory
sys.argv = ["throughput.py", *sys.argv[1:]]
runpy.run_path("benchmarks/throughput.py", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_benchmark_measures_the_trainer_when_the_hand_loop_runs_out_of_memory():
    proc = subprocess.run(
        [sys.executable, "-c", _OOM_BENCH, "--gin_file=gin/gla.gin", "--steps=3", "--warmup=1"]
        + [f"--gin_bindings={b}" for b in TINY],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["baseline"] == {"out_of_memory": "CUDA out of memory. Tried to allocate 1.95 GiB."}
    assert "ratio" not in line and "baseline_mfu_vendor" not in line
    assert line["flame_gin"]["tokens_per_second"] > 0 and line["tokens_per_second"] > 0
