"""Held-out loss of trained models, one evaluation code for all: flame_gin against another framework.

    python benchmarks/heldout_compare.py split --corpus=corpus.jsonl --out=DIR [--share=0.03]
    python benchmarks/heldout_compare.py eval --heldout=DIR/heldout.jsonl --tokenizer=TOK NAME=MODEL ...

``split``: the documents whose text hash (64-bit BLAKE2b, as a fraction of 2**64) falls below ``share`` go to
``heldout.jsonl``; the rest, shuffled with a fixed seed, to ``train.jsonl``, so no framework meets the corpus in
its original (path-sorted) order and neither trains on a held-out document.

``eval``: every model reads the same held-out tokens (each document as BOS + tokens + EOS, concatenated, cut
into rows of ``seq_len``; the last partial row dropped) and gets its mean token cross-entropy, in float32 over
its logits (bf16 on a GPU). ``MODEL`` is a Hugging Face folder (flame_gin's export) or, with ``--config``, a
``torch.distributed.checkpoint`` folder of another trainer (its ``model`` entry, or the whole state when it
holds weights only). Names ``<group>_s<seed>`` are summarised per group: mean, standard deviation, count.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import statistics
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from flame_gin.data import sources  # noqa: E402


def split(*, corpus: str, out: str, share: float, seed: int = 0) -> dict:
    train, held = [], []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            text = json.loads(line)["text"]
            (held if sources.held_out(text, share=share) else train).append(line.rstrip("\n"))
    random.Random(seed).shuffle(train)
    folder = pathlib.Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in (("train", train), ("heldout", held)):
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"train_documents": len(train), "heldout_documents": len(held)}


def heldout_rows(*, path: str, tokenizer: str, seq_len: int):
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    ids = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                doc = tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
                ids += [tok.bos_token_id, *doc, tok.eos_token_id]
    rows = len(ids) // seq_len
    return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)


def load_model(path: str, *, config: str | None, device):
    """The model in eval mode on ``device`` (bf16 on a GPU), with the kernels of ``device``: an HF folder as
    ``python -m flame_gin.eval`` loads one, or a DCP folder's weights into ``config``'s model."""
    import torch

    from flame_gin import eval as eval_lib

    if config is None:
        return eval_lib.load_model(checkpoint_dir=None, step=None, hf_dir=path, device=device)[0]
    import fla  # noqa: F401  (registers FLA's model types with transformers)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoConfig, AutoModelForCausalLM

    from flame_gin import kernels

    kernels.select(mode="auto")  # FLA's Triton kernels on a GPU, the reference kernels on a CPU
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, os.path.join(tmp, "state.pt"))
        state = torch.load(os.path.join(tmp, "state.pt"), map_location="cpu", weights_only=False)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config))
    model.load_state_dict(state.get("model", state), strict=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).eval()


def heldout_loss(model, rows, *, batch: int, device) -> float:
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            x = rows[i : i + batch].to(device)
            logits = model(input_ids=x[:, :-1]).logits.float()
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum")
            total, count = total + float(loss), count + x[:, 1:].numel()
    return total / count


def summarise(losses: dict[str, float]) -> dict:
    groups: dict[str, list[float]] = {}
    for name, loss in losses.items():
        groups.setdefault(name.rsplit("_s", 1)[0], []).append(loss)
    return {
        g: {
            "mean": round(statistics.fmean(v), 4),
            "sd": round(statistics.stdev(v), 4) if len(v) > 1 else None,
            "n": len(v),
        }
        for g, v in groups.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("split")
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--share", type=float, default=0.03)
    p = sub.add_parser("eval")
    p.add_argument("--heldout", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--config", default=None, help="model config json, for torch.distributed.checkpoint folders")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("models", nargs="+", help="NAME=PATH")
    args = parser.parse_args()
    if args.command == "split":
        print(json.dumps({"benchmark": "heldout_compare", **split(corpus=args.corpus, out=args.out, share=args.share)}))
        return
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = heldout_rows(path=args.heldout, tokenizer=args.tokenizer, seq_len=args.seq_len)
    losses = {}
    for spec in args.models:
        name, path = spec.split("=", 1)
        is_dcp = (pathlib.Path(path) / ".metadata").exists()
        model = load_model(path, config=args.config if is_dcp else None, device=device)
        losses[name] = round(heldout_loss(model, rows, batch=args.batch, device=device), 4)
        print(name, losses[name], flush=True)
        del model
    out = {"benchmark": "heldout_compare", "tokens": int(rows[:, 1:].numel()), "losses": losses}
    print(json.dumps({**out, "groups": summarise(losses)}))


if __name__ == "__main__":
    main()
