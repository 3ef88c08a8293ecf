"""What one compiled block keeps for its backward: the tensors that AOTAutograd's min-cut partition (the one
inductor uses) makes the forward graph hand to the backward, with their sizes.

Why: a compiled block's peak memory is set by these tensors, and which ones the partitioner keeps depends on
how the block's ops are written (a shifted copy that is saved once per lag costs as much as the input again).
The partition does not depend on the device, so this runs on a CPU in seconds (kernel mode "compiled", bf16
autocast, one block of the gin-configured model) and answers before a GPU run is spent on it.
  python3 benchmarks/saved_activations.py --gin_file=gin/delta_net.gin --tokens=2048 [--stream_dtype=bfloat16]
(``--stream_dtype``: the residual stream entering the block; float32 is what one GPU's float32 parameters
under autocast give, bfloat16 what FSDP's bf16 parameters give.)
Prints the largest saved tensors and one JSON line last: MiB per block for `tokens` tokens and, from a second
partition at twice the tokens, the part that grows with tokens (activations) apart from the part that does
not (bf16 weight copies), scaled to the configured batch and all layers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def saved_tensors(
    block: torch.nn.Module, *, tokens: int, hidden: int, stream_dtype: torch.dtype = torch.float32
) -> list[tuple[int, str, tuple, str]]:
    """(bytes, dtype, shape, node name) of each forward-graph output of the compiled block, largest first (the
    block's own output included). ``stream_dtype``: the dtype of the hidden states entering the block (float32
    where the embedding's output is, as with float32 parameters under autocast)."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    rows = []

    def forward_compiler(gm, example_inputs):
        del example_inputs
        output = next(n for n in gm.graph.nodes if n.op == "output")
        for node in output.args[0]:
            value = getattr(node, "meta", {}).get("val")
            if isinstance(value, torch.Tensor):
                rows.append((value.numel() * value.element_size(), str(value.dtype), tuple(value.shape), node.name))
        return gm.forward

    backend = aot_autograd(
        fw_compiler=forward_compiler,
        bw_compiler=lambda gm, _: gm.forward,
        partition_fn=min_cut_rematerialization_partition,
    )
    block.compile(backend=backend, fullgraph=True, dynamic=False)
    x = torch.randn(1, tokens, hidden, dtype=stream_dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        block(x)
    return sorted(rows, reverse=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument(
        "--stream_dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="dtype of the residual stream entering the block (float32: one GPU's float32 parameters under autocast)",
    )
    args = parser.parse_args()

    import transformers

    import gin
    from flame_gin import config as config_lib
    from flame_gin import configurables, kernels  # noqa: F401 (configurables: registers flame_gin.run and the rest)
    from flame_gin.parallel.compile import configure_dynamo

    config_lib.parse(
        gin_files=args.gin_file,
        gin_bindings=["MODEL_DIR = '/tmp/flame_gin_saved'", *args.gin_bindings],
        search_paths=config_lib.default_search_paths(),
    )
    config = gin.query_parameter("flame_gin.run.model_config").scoped_configurable_fn()
    batch, seq = (config_lib.bound_value(f"flame_gin.run.{name}") for name in ("batch_size", "seq_len"))
    layers = config.num_hidden_layers
    config.num_hidden_layers = 1
    kernels.select(mode="compiled")
    configure_dynamo()
    torch.manual_seed(0)

    def mib_saved(tokens):
        torch._dynamo.reset()
        block = transformers.AutoModelForCausalLM.from_config(config).model.layers[0]
        rows = saved_tensors(
            block, tokens=tokens, hidden=config.hidden_size, stream_dtype=getattr(torch, args.stream_dtype)
        )
        return rows, sum(r[0] for r in rows) / 2**20

    rows, mib = mib_saved(args.tokens)
    _, mib_twice = mib_saved(2 * args.tokens)
    per_token, fixed = (mib_twice - mib) / args.tokens, 2 * mib - mib_twice
    for size, dtype, shape, name in rows[: args.top]:
        print(f"{size / 2**20:8.2f} MiB  {dtype:15s} {str(shape):22s} {name}")
    print(
        json.dumps(
            {
                "family": config.model_type,
                "tokens": args.tokens,
                "stream_dtype": args.stream_dtype,
                "mib_per_block": round(mib, 2),
                "saved_tensors": len(rows),
                "batch": batch,
                "seq_len": seq,
                "layers": layers,
                "mib_per_token_per_block": round(per_token, 5),
                "fixed_mib_per_block": round(fixed, 2),
                "gib_all_layers_at_batch": round(layers * (fixed + per_token * batch * seq) / 1024, 2),
            }
        )
    )


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
