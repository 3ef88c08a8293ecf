"""Where one training step's GPU time goes: the hand-written loop's step (FLA model, autocast bf16, fused AdamW)
under the torch profiler, kernels grouped by kind.

Why: the throughput target is a ratio against that loop; before a lever is built, the profile says how much of
the step it can touch (a 10% kernel cannot give 30%).
  python3 benchmarks/step_profile.py --gin_file=gin/gla.gin --steps=3
With ``--trace``, the same grouping of a Chrome trace that the trainer's profiler wrote (``flame_gin.profiler``),
so the trainer's own step (compiled blocks included) is read the same way; ``--steps`` is the steps it covers:
  python3 benchmarks/step_profile.py --trace=WORKDIR/profile/step_20/rank0_trace.json --steps=2
Prints the top kernels and one JSON line last: milliseconds per step and share per kind; for a trace also how
busy the GPU was over the traced window (kernel time over wall time, overlaps merged).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

import torch

KINDS = (  # first match wins; names are CUDA kernel names (Triton kernels keep their Python names)
    ("inductor-generated", r"triton_(poi|red|per|tem)"),  # before the rest: fused names mention norms
    ("attention (FLA chunk kernels)", r"chunk|fwd_h|bwd_dh|wy|solve_tril|kkt|recompute_w_u|cumsum|gla|delta"),
    ("loss (cross-entropy)", r"cross_entropy|logsumexp|softmax|ce_"),
    ("matmul (cuBLAS/cutlass)", r"gemm|cutlass|sm90|nvjet|xmma|cublas"),
    ("norms and gates (FLA Triton)", r"norm|swiglu|swish|sigmoid|silu|layer_norm|rms"),
    ("optimizer (fused AdamW, clipping)", r"adam|foreach|multi_tensor|norm_kernel|lpnorm"),
    ("elementwise and copies", r"elementwise|vectorized|copy|fill|cat|index|reduce|Memcpy|Memset"),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return kind
    return "other"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace", default="", help="Chrome trace of the trainer's profiler to read instead.")
    args = parser.parse_args()
    if args.trace:
        report(*trace_kernels(args.trace, steps=args.steps), top=args.top, header={"trace": args.trace})
        return

    import transformers

    import gin
    from flame_gin import config as config_lib
    from flame_gin import configurables, kernels  # noqa: F401 (configurables: registers flame_gin.run and the rest)

    config_lib.parse(
        gin_files=args.gin_file,
        gin_bindings=["MODEL_DIR = '/tmp/flame_gin_profile'", *args.gin_bindings],
        search_paths=config_lib.default_search_paths(),
    )
    model_config = gin.query_parameter("flame_gin.run.model_config").scoped_configurable_fn()
    batch, seq = (config_lib.bound_value(f"flame_gin.run.{name}") for name in ("batch_size", "seq_len"))
    if not torch.cuda.is_available():  # after the config, so that its errors come first on any machine
        sys.exit(
            f"step_profile: profiling the {model_config.model_type} hand loop ({batch} x {seq}) needs a CUDA GPU; "
            "--trace reads a trainer's trace on any machine"
        )
    kernels.select(mode="triton")
    device = torch.device("cuda")
    torch.manual_seed(0)
    with device:
        model = transformers.AutoModelForCausalLM.from_config(model_config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, model_config.vocab_size, (batch, seq), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # compile, autotune, allocator warm-up
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    per_kernel = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name] += event.device_time / 1e3 / args.steps  # ms per step
    report(
        per_kernel,
        {},
        top=args.top,
        header={
            "device": torch.cuda.get_device_name(),
            "family": model_config.model_type,
            "batch": batch,
            "seq_len": seq,
        },
    )


def trace_kernels(path: str, *, steps: int) -> tuple[collections.Counter, dict]:
    """Milliseconds per step per kernel name in a Chrome trace, and the GPU's busy share of the traced window."""
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        raise ValueError(f"{path}: no GPU kernel events (was the trace taken on a GPU?)")
    per_kernel = collections.Counter()
    for e in kernels:
        per_kernel[e["name"]] += e["dur"] / 1e3 / steps
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    busy, end = 0.0, spans[0][0]
    for start, stop in spans:  # union of kernel intervals
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    window = spans[-1][1] - spans[0][0]
    return per_kernel, {"wall_ms_per_step": round(window / 1e3 / steps, 2), "gpu_busy": round(busy / window, 4)}


def by_kind(per_kernel: collections.Counter) -> collections.Counter:
    shares = collections.Counter()
    for name, ms in per_kernel.items():
        shares[kind_of(name)] += ms
    return shares


def report(per_kernel: collections.Counter, extra: dict, *, top: int, header: dict) -> dict:
    """Prints the top kernels, then one JSON line (``header`` and the summary); returns the summary: per-step
    totals, ``extra``, and milliseconds and shares by kind."""
    total = sum(per_kernel.values())
    for name, ms in per_kernel.most_common(top):
        print(f"{ms:8.2f} ms {100 * ms / total:5.1f}%  [{kind_of(name)}] {name[:110]}")
    shares = by_kind(per_kernel)
    summary = {
        "gpu_ms_per_step": round(total, 2),
        **extra,
        "share": {k: round(v / total, 4) for k, v in shares.most_common()},
        "ms": {k: round(v, 2) for k, v in shares.most_common()},
    }
    print(json.dumps({**header, **summary}))
    return summary


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
