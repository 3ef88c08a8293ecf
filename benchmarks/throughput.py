"""Training throughput of flame_gin against a hand-written loop, in one process, on the same batches.

Why: a tokens/s figure means little alone (clocks, drivers and kernels vary between machines), so every run
measures, in the same process and on the same synthetic batches, a plain loop (the FLA model from
``AutoModelForCausalLM.from_config``, autocast bf16, fused AdamW, no compile, ``model(input_ids, labels)``)
and reports flame_gin's speed as a ratio of it.

  python benchmarks/throughput.py --gin_file=gin/gla.gin --gin_file=gin/data/embedded.gin --steps=30 --warmup=10

The gin files give the model, batch and sequence length; the trainer (``flame_gin.run``) is called with a
synthetic random-token loader (``--data=synthetic``, default; varlen when ``flame_gin.run.varlen = True``) or
with the loader the gin files bind (``--data=gin``). The last line printed is one JSON object: steady-state
tokens/s after ``--warmup`` steps, peak memory (and the host's, which bounds offloaded runs), time to the first
step, FLOPs per token and MFU against both the vendor peak and the bf16 matrix-product peak measured on this
device. Where the hand loop runs out of memory, its entry says so and the line has no ratio; the trainer is
still measured.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import sys
import tempfile
import time

import hand_loop
from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Command-line flags, defined only when run as a script (importing the module for its loaders defines none)."""
    flags.DEFINE_multi_string("gin_file", [], "Gin files (later override earlier).")
    flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings applied after the files.")
    flags.DEFINE_integer("steps", 30, "Training steps per measured loop.")
    flags.DEFINE_integer("warmup", 10, "Steps left out of the steady-state figure.")
    flags.DEFINE_enum("data", "synthetic", ["synthetic", "gin"], "Synthetic random tokens, or the gin-bound loader.")
    flags.DEFINE_integer(
        "doc_tokens",
        0,
        "Varlen synthetic batches: mean document length (0: lengths scale with seq_len; see SyntheticLoader).",
    )
    flags.DEFINE_bool("baseline", True, "Also run the hand-written loop and report the ratio.")
    flags.DEFINE_bool(
        "baseline_syncs",
        False,
        "Also run the hand-written loop with the trainer's per-step host "
        "syncs (token count, loss and grad norm read back), to price them.",
    )
    flags.DEFINE_bool(
        "baseline_ac",
        False,
        "Checkpoint every block of the hand-written loop (torch's checkpoint wrapper), the "
        "counterpart of gin/parallel/memory_saving.gin where the plain loop does not fit.",
    )
    flags.DEFINE_bool("measure_peak", True, "Time a large bf16 matrix product for a measured-peak MFU (GPU only).")
    flags.DEFINE_enum(
        "fused_kernel",
        "",
        ["", "linear", "logits"],
        "FLA loss kernel behind the trainer's fused loss on GPU (empty: flame_gin.loss.DEFAULT_FUSED).",
    )
    flags.DEFINE_string(
        "trace_dir",
        "",
        "Profile the trainer's steps warmup+1..warmup+2 into this directory and add "
        "their kernel summary (benchmarks/step_profile.py) to the JSON line; the profiler slows "
        "those steps, so read tokens/s from a run without it.",
    )
    flags.DEFINE_string(
        "workdir",
        "",
        "The trainer's run directory (its kernel cache lands in WORKDIR/kernel_cache, "
        "so a second process given the same directory starts from it); empty: a new temporary one.",
    )
    flags.DEFINE_string("label", "", "Free text copied into the JSON line.")
    flags.DEFINE_string("json_out", "", "Also append the JSON line to this file.")


FUSE_KEYS = ("fuse_norm", "fuse_swiglu", "fuse_cross_entropy", "fuse_linear_cross_entropy")


class CaptureWriter:
    """A metric writer that keeps every scalar row with the wall-clock time it arrived."""

    def __init__(self):
        self.rows: list[tuple[float, int, dict]] = []

    def write_scalars(self, step, scalars):
        self.rows.append((time.perf_counter(), int(step), dict(scalars)))

    def write_hparams(self, hparams):
        pass

    def write_texts(self, step, texts):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def run_trainer(
    *, run_fn, loader_factory, device, steps: int, warmup: int, tokens_per_step: int, profiler=None, workdir: str = ""
) -> dict:
    """The trainer for ``steps`` steps with a capturing writer (no eval, no checkpoints).

    It logs every ``gcd(warmup, steps)`` steps, not every step: a log reads the loss back from the device, which
    the trainer otherwise never waits for, so per-step logging would price in a host synchronisation per step.
    The end of the first step is taken (after a device synchronisation) by the trainer's first-step callback.
    """
    hand_loop.free_memory(device)
    writer = CaptureWriter()
    first = {}

    def on_first_step() -> str:
        if device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        first["t"] = time.perf_counter()
        return "# throughput benchmark: no operative config written\n"

    with contextlib.nullcontext(workdir) if workdir else tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        kwargs = {"train_data": loader_factory} if loader_factory is not None else {}
        status = run_fn(
            workdir=workdir,
            train_steps=steps,
            log_interval=math.gcd(warmup, steps),
            evaluation=None,
            checkpointer=None,
            profiler=profiler,
            writers=lambda **_: writer,
            on_first_step=on_first_step,
            **kwargs,
        )
    if status != 0:
        raise RuntimeError(f"flame_gin.run returned {status}")
    times = {step: t for t, step, _ in writer.rows}
    last = writer.rows[-1][2]
    peak = max(row[2].get("peak_memory_gib", 0.0) for row in writer.rows)
    result = {
        "tokens_per_second": hand_loop.steady_rate(
            times=times, warmup=warmup, steps=steps, tokens_per_step=tokens_per_step
        ),
        "peak_memory_gib": peak if device.type == "cuda" else None,
        "time_to_first_step_s": first["t"] - t0,
        "final_loss": float(last["loss"]),
        "trainer_mfu_last": last.get("mfu"),
    }
    hand_loop.free_memory(device)
    return result


def _round(value, digits=4):
    return round(value, digits) if isinstance(value, float) else value


def main(argv):
    del argv
    import torch

    import gin
    from flame_gin import config as config_lib
    from flame_gin import configurables, flops, process  # noqa: F401 (registers gin)
    from flame_gin import loss as loss_lib

    if FLAGS.fused_kernel:
        loss_lib.DEFAULT_FUSED = FLAGS.fused_kernel
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")  # autotuning results persist with the kernel cache
    bindings = [
        f"MODEL_DIR = '{tempfile.gettempdir()}/flame_gin_throughput'",
        *FLAGS.gin_bindings,
        "flame_gin.lr_schedule.warmup_steps = 0",
    ]  # the LR ramp has no bearing on speed; short runs need 0
    config_lib.parse(gin_files=FLAGS.gin_file, gin_bindings=bindings, search_paths=config_lib.default_search_paths())
    try:  # a typed binding that changes nothing would measure another configuration than the one asked for
        config_lib.check_bindings_reached(root="flame_gin.run", command_line=FLAGS.gin_bindings)
    except config_lib.ConfigError as e:
        sys.exit(f"throughput: {e}")
    model_config = gin.query_parameter("flame_gin.run.model_config").scoped_configurable_fn()
    seq_len = config_lib.bound_value("flame_gin.run.seq_len", None)
    batch_size = config_lib.bound_value("flame_gin.run.batch_size", None)
    lr = config_lib.bound_value("flame_gin.adamw.lr", None)
    varlen = config_lib.bound_value("flame_gin.run.varlen", False)
    fused_loss = config_lib.bound_value("flame_gin.run.fused_loss", "auto")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens_per_step = batch_size * seq_len

    def synthetic(**kw):
        return hand_loop.SyntheticLoader(
            vocab_size=model_config.vocab_size,
            seq_len=kw["seq_len"],
            batch_size=kw["batch_size"],
            seed=kw["seed"],
            varlen=kw["varlen"],
            doc_tokens=FLAGS.doc_tokens,
        )

    if FLAGS.data == "synthetic":
        loader_factory, baseline_loader = (
            synthetic,
            lambda: synthetic(seq_len=seq_len, batch_size=batch_size, seed=42, varlen=varlen),
        )
    else:
        ref = gin.query_parameter("flame_gin.run.train_data").scoped_configurable_fn
        loader_factory = None
        baseline_loader = lambda: iter(
            ref(seq_len=seq_len, batch_size=batch_size, rank=0, world_size=1, seed=42, split="train", varlen=varlen)
        )

    out = {
        "label": FLAGS.label,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "family": model_config.model_type,
        "batch": batch_size,
        "seq_len": seq_len,
        "varlen": varlen,
        "steps": FLAGS.steps,
        "warmup": FLAGS.warmup,
        "baseline_ac": FLAGS.baseline_ac,
        "doc_tokens": FLAGS.doc_tokens if varlen else None,
        "gin_files": FLAGS.gin_file,
        "gin_bindings": FLAGS.gin_bindings,
        "fused_loss": fused_loss,
        "fused_kernel": loss_lib.DEFAULT_FUSED,
        **{k: getattr(model_config, k, None) for k in FUSE_KEYS},
    }
    try:
        import fla
        import triton

        out.update(fla=fla.__version__, triton=triton.__version__)
    except ImportError:
        pass
    fpt = float(flops.flops_per_token(config=model_config, seq_len=seq_len))
    out["flops_per_token"] = fpt
    vendor_peak = {"H100": 989.0, "H200": 989.0}.get(
        next((k for k in ("H100", "H200") if k in out["device"]), ""), None
    )
    measured = hand_loop.measured_peak_tflops(device) if FLAGS.measure_peak else None
    out.update(vendor_peak_tflops=vendor_peak, measured_peak_tflops=_round(measured, 1))

    def mfu(tps, peak):
        return _round(tps * fpt / (peak * 1e12)) if peak else None

    training = dict(device=device, steps=FLAGS.steps, warmup=FLAGS.warmup)
    from flame_gin import kernels

    kernels.select(mode="auto")  # the trainer does the same; on CPU the baseline needs the reference ops too
    if FLAGS.baseline:  # first: on a cold machine it pays FLA's Triton compilation and autotuning
        base = hand_loop.run_baseline_or_oom(
            config=model_config,
            loader=baseline_loader(),
            lr=lr,
            weight_decay=0.1,
            max_grad_norm=1.0,
            syncs=False,
            checkpointing=FLAGS.baseline_ac,
            **training,
        )
        out["baseline"] = {k: _round(v) for k, v in base.items()}
        print("baseline:", json.dumps(out["baseline"]), flush=True)
    if FLAGS.baseline_syncs:
        synced = hand_loop.run_baseline_or_oom(
            config=model_config,
            loader=baseline_loader(),
            lr=lr,
            weight_decay=0.1,
            max_grad_norm=1.0,
            syncs=True,
            checkpointing=FLAGS.baseline_ac,
            **training,
        )
        out["baseline_with_syncs"] = {k: _round(v) for k, v in synced.items()}
        print("baseline with syncs:", json.dumps(out["baseline_with_syncs"]), flush=True)
    profiler = None
    if FLAGS.trace_dir:
        from flame_gin import profiling

        def profiler(*, workdir, rank):  # the trainer's profiler, writing to trace_dir instead of its workdir
            del workdir
            return profiling.Profiler(workdir=FLAGS.trace_dir, rank=rank, interval=FLAGS.warmup, active_steps=2)

    ours = run_trainer(
        run_fn=configurables.run,
        loader_factory=loader_factory,
        tokens_per_step=tokens_per_step,
        profiler=profiler,
        workdir=FLAGS.workdir,
        **training,
    )
    if FLAGS.trace_dir:
        import step_profile

        trace = os.path.join(FLAGS.trace_dir, "profile", f"step_{FLAGS.warmup}", "rank0_trace.json")
        per_kernel, busy = step_profile.trace_kernels(trace, steps=2)
        out["profile"] = step_profile.report(per_kernel, busy, top=30, header={"trace": trace})
    out["flame_gin"] = {k: _round(v) for k, v in ours.items()}
    out["tokens_per_second"] = round(ours["tokens_per_second"])
    out["peak_memory_gib"] = _round(ours["peak_memory_gib"], 2)
    out["time_to_first_step_s"] = _round(ours["time_to_first_step_s"], 2)
    # the process's peak resident memory: on a GPU, what FSDP's CPU offload (pinned parameters and gradients,
    # AdamW states) and the loaders hold on the host, whose size bounds the largest offloaded model
    out["host_peak_gib"] = _round(process.peak_memory_gib(torch.device("cpu")), 2)
    out["mfu_vendor"] = mfu(ours["tokens_per_second"], vendor_peak)
    out["mfu_measured"] = mfu(ours["tokens_per_second"], measured)
    if FLAGS.baseline and "tokens_per_second" in base:  # no ratio where the hand loop ran out of memory
        out["ratio"] = _round(ours["tokens_per_second"] / base["tokens_per_second"], 3)
        out["baseline_mfu_vendor"] = mfu(base["tokens_per_second"], vendor_peak)
    cache_dir = os.environ.get("TRITON_CACHE_DIR")  # where the trainer's kernel cache went (flame_gin.kernels.cache)
    if cache_dir and os.path.isdir(cache_dir):
        out["kernel_cache"] = {"dir": cache_dir, "autotune_results": len(glob.glob(f"{cache_dir}/*/*.autotune.json"))}
    line = json.dumps(out)
    if FLAGS.json_out:
        with open(FLAGS.json_out, "a") as f:
            f.write(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _define_flags()
    app.run(main)
