"""GPU parity of FLA's Triton kernels and flame_gin's PyTorch reference kernels.

    python benchmarks/kernel_parity.py --families=gla,delta_net,gated_deltanet --dtypes=float32,bfloat16
    python benchmarks/kernel_parity.py --against=compiled --dtypes=bfloat16   # FLA's ops against compiled mode's

For each model family a small model (hidden 256, 2 layers, T 256, batch 2 by default) is built once
with a fixed seed; the same weights and batch are run through forward loss (FLA's own causal-LM loss,
so the fused cross-entropy is compared too) and backward, first with the Triton kernels and then with
the reference kernels. Printed per family and dtype: the relative loss difference and the largest
relative gradient difference over parameters, max_p ||g_ref - g_tri|| / ||g_tri||. With
``--against=compiled`` the second run uses compiled mode's kernels instead (without `torch.compile`): FLA's
chunked GLA and DeltaNet ops as flame_gin's custom ops (DeltaNet's q/k L2 norms in PyTorch), and PyTorch
norms, activations and short convolutions: the check that compiled blocks train the model FLA's own ops
train. The last line is one JSON object with every result. A Triton path that raises is reported with the error, never worked
around: FLA 0.6 refuses Gated DeltaNet's backward on Hopper with Triton 3.4-3.7.0 (then only the forward
loss is compared, status "forward_only"), and its chunked DeltaNet kernel refuses float32 inputs.
Expected: fp32 differences around 1e-6..1e-4; bf16 around 1e-3..1e-2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback

import torch

from flame_gin import kernels


def _config(*, family: str, hidden: int, layers: int, vocab: int, heads: int = 4, head_dim: int = 64):
    from fla.models import DeltaNetConfig, GatedDeltaNetConfig, GLAConfig

    common = dict(hidden_size=hidden, num_hidden_layers=layers, vocab_size=vocab)
    if family == "gla":
        return GLAConfig(**common, num_heads=heads)
    if family == "delta_net":
        return DeltaNetConfig(**common, num_heads=heads)
    if family == "gated_deltanet":
        return GatedDeltaNetConfig(**common, num_heads=heads, head_dim=head_dim)
    raise ValueError(f"unknown family {family!r} (gla, delta_net, gated_deltanet)")


def _model(*, family: str, args):
    from transformers import AutoModelForCausalLM

    config = _config(
        family=family,
        hidden=args.hidden,
        layers=args.layers,
        vocab=args.vocab,
        heads=args.num_heads,
        head_dim=args.head_dim,
    )
    return AutoModelForCausalLM.from_config(config)


def comma_separated_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _step(*, mode: str, family: str, state: dict, ids: torch.Tensor, dtype: torch.dtype, args) -> dict:
    """Builds the model under `mode` (some layers bind activations at construction), loads `state`,
    runs loss + backward; returns the loss and per-parameter gradients in float32."""
    kernels.select(mode=mode)
    model = _model(family=family, args=args)
    model.load_state_dict(state)
    model = model.cuda().train()
    autocast = torch.autocast("cuda", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    start = time.perf_counter()
    with autocast:
        extra = {} if args.cu_seqlens is None else {"cu_seqlens": torch.tensor(args.cu_seqlens).int().cuda()}
        loss = model(input_ids=ids, labels=ids, **extra).loss
    try:
        loss.backward()
    except Exception as err:  # reported, not bypassed (e.g. FLA's Hopper/Triton refusal for Gated DeltaNet)
        traceback.print_exc()
        return dict(
            loss=loss.detach().float(),
            grads=None,
            seconds=time.perf_counter() - start,
            backward_error=f"{type(err).__name__}: {err}"[:600],
        )
    torch.cuda.synchronize()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return dict(loss=loss.detach().float(), grads=grads, seconds=time.perf_counter() - start)


def _compare(*, triton: dict, reference: dict) -> dict:
    loss_rel = ((reference["loss"] - triton["loss"]).abs() / triton["loss"].abs()).item()
    if triton["grads"] is None:
        return dict(
            loss_triton=triton["loss"].item(),
            loss_reference=reference["loss"].item(),
            loss_rel_diff=loss_rel,
            grad_max_rel_diff=None,
            triton_backward_error=triton["backward_error"],
        )
    worst, worst_name, skipped = 0.0, None, 0
    for name, g_tri in triton["grads"].items():
        norm = g_tri.norm().item()
        if norm == 0.0:
            skipped += 1
            continue
        rel = (reference["grads"][name] - g_tri).norm().item() / norm
        if rel > worst:
            worst, worst_name = rel, name
    return dict(
        loss_triton=triton["loss"].item(),
        loss_reference=reference["loss"].item(),
        loss_rel_diff=loss_rel,
        grad_max_rel_diff=worst,
        grad_worst_param=worst_name,
        grads_compared=len(triton["grads"]) - skipped,
        grads_zero_skipped=skipped,
        seconds_triton=round(triton["seconds"], 2),
        seconds_reference=round(reference["seconds"], 2),
    )


def _one(*, family: str, dtype: torch.dtype, args) -> dict:
    torch.manual_seed(args.seed)
    kernels.select(mode="triton")
    model = _model(family=family, args=args)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del model
    ids = torch.randint(
        0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(args.seed)
    ).cuda()
    result = dict(family=family, dtype=str(dtype).removeprefix("torch."), against=args.against)
    try:
        triton = _step(mode="triton", family=family, state=state, ids=ids, dtype=dtype, args=args)
    except Exception as err:  # reported, not bypassed (e.g. FLA's Hopper/Triton refusal for Gated DeltaNet)
        result.update(status="triton_failed", error=f"{type(err).__name__}: {err}"[:600])
        traceback.print_exc()
        return result
    reference = _step(mode=args.against, family=family, state=state, ids=ids, dtype=dtype, args=args)
    status = "ok" if triton["grads"] is not None else "forward_only"
    result.update(status=status, **_compare(triton=triton, reference=reference))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="gla,delta_net,gated_deltanet")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=64, help="Gated DeltaNet's (the others: hidden / heads)")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--against", choices=("reference", "compiled"), default="reference")
    parser.add_argument(
        "--cu_seqlens",
        default=None,
        type=comma_separated_ints,
        help="packed documents, e.g. 0,100,300,512 (batch 1 of the last length)",
    )
    parser.add_argument("--out", default=None, help="also append each result as a JSON line to this file")
    args = parser.parse_args(argv)
    cuts = args.cu_seqlens
    if cuts is not None and (args.batch != 1 or cuts[0] != 0 or cuts[-1] != args.seq_len or cuts != sorted(cuts)):
        parser.error(f"--cu_seqlens={','.join(map(str, cuts))}: needs --batch=1 and rising cuts from 0 to --seq_len")
    if not torch.cuda.is_available():
        print("kernel_parity needs a CUDA device", file=sys.stderr)
        return 2
    import fla
    import triton

    header = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, fla=fla.__version__
    )
    print(json.dumps(header), flush=True)
    results = []
    for family in args.families.split(","):
        for dtype_name in args.dtypes.split(","):
            result = _one(family=family, dtype=getattr(torch, dtype_name), args=args)
            results.append(result)
            print(json.dumps(result), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(result) + "\n")
    kernels.select(mode="triton")
    print(json.dumps(dict(**header, results=results)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
