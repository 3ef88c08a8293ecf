"""Time and memory of the LM-head loss alone (forward + backward) under each of flame_gin's loss paths.

Why: the whole-model benchmark on a cold GPU machine spends minutes autotuning FLA's attention kernels; the
loss head (hidden [tokens, d] -> vocabulary) is where the paths differ, and it can be measured in seconds.
  python3 benchmarks/loss_kernels.py --tokens=32768 --hidden=1024 --vocab=32000
Prints one JSON line per path: milliseconds per forward+backward and the peak memory above the inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F


def _paths():
    from flame_gin import loss

    def fp32_torch(hidden, head, labels):
        logits = head(hidden).float()
        return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")

    return {
        "fp32_logits_torch_ce": fp32_torch,
        "fla_linear_ce": lambda h, w, y: loss.fla_token_loss_sum(hidden=h, head=w, labels=y, mode="linear"),
        "fla_bf16_logits_ce": lambda h, w, y: loss.fla_token_loss_sum(hidden=h, head=w, labels=y, mode="logits"),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=device)
    labels = torch.randint(0, args.vocab, (args.tokens,), device=device)
    base = torch.randn(args.tokens, args.hidden, device=device, dtype=torch.bfloat16)
    reference = None
    for name, fn in _paths().items():

        def step():
            hidden = base.clone().requires_grad_()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fn(hidden, head, labels)
            loss.backward()
            head.weight.grad = None
            return loss

        for _ in range(3):
            loss = step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.iters):
            loss = step()
        end.record()
        torch.cuda.synchronize()
        value = float(loss) / args.tokens
        reference = value if reference is None else reference
        print(
            json.dumps(
                {
                    "path": name,
                    "ms": round(start.elapsed_time(end) / args.iters, 2),
                    "peak_above_inputs_gib": round((torch.cuda.max_memory_allocated() - before) / 2**30, 2),
                    "mean_loss": round(value, 5),
                    "diff_vs_fp32": round(value - reference, 5),
                    "tokens": args.tokens,
                    "hidden": args.hidden,
                    "vocab": args.vocab,
                    "device": torch.cuda.get_device_name(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
