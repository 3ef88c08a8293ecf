"""Data at scale through token stores: prepare throughput, bytes read by many streams, resume time.

    python benchmarks/data_scale.py [--repeat=1] [--shards=64] [--streams=64] [--processes=2]

Builds (cached) the ~100 MB source-code corpus and 32K byte-level BPE of ``data_throughput.py``, written
``--repeat`` times over as ``--shards`` jsonl shards, then measures what issue "data at scale" asks:

- prepare: the token store of the sharded source, built as ``python -m flame_gin.data.prepare`` builds it
  (``build_loader(offline=True, store_processes=P)``), in tokens/s and tokens/s per process, against the bare
  fast tokenizer's tokens per CPU-second on the same documents (the ceiling per core);
- bytes read: ``--streams`` data-parallel ranks each read their share of one epoch (8 x 2048 batches); the
  token bytes they fetched from the store together, over the store's token bytes (goal <= 1.1; a streaming
  source is read whole by every stream: N);
- resume: one rank reads half an epoch, saves its loader state, and a new loader restored from it gives its
  first batch: the seconds that takes (goal < 5 s), and that this batch is the one the first loader gives next.

``--paths=streaming`` (or ``store,streaming``, the default) measures the same source read as a stream by
blocks (4 MiB byte ranges of the jsonl shards, ``shards.Blocks``), with no store:

- bytes read: ``--streams`` streams each read their blocks of one epoch (documents parsed, not tokenized);
  the bytes they fetched together over the corpus bytes (goal <= 1.1), and the largest stream's share;
- resume: a stream restored at 50% of the epoch (its reader's state after half of the documents, as a saved
  loader state holds it) gives its first batch: the seconds that takes from building the plan (goal < 5 s),
  and the bytes it read first. (``tests/test_shards.py`` checks that such a batch is the one the stream gives.)

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import data_throughput  # noqa: E402

SEQ_LEN, BATCH = 2048, 8


def shard_corpus(*, corpus: pathlib.Path, out: pathlib.Path, shards: int, repeat: int) -> list[str]:
    """``corpus`` written ``repeat`` times over as ``shards`` jsonl files (round robin by line; cached)."""
    files = [out / f"shard-{i:05d}.jsonl" for i in range(shards)]
    if all(f.exists() for f in files):
        return [str(f) for f in files]
    out.mkdir(parents=True, exist_ok=True)
    handles = [open(f.with_suffix(".tmp"), "w", encoding="utf-8") for f in files]
    n = 0
    for _ in range(repeat):
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                handles[n % shards].write(line)
                n += 1
    for h, f in zip(handles, files):
        h.close()
        os.replace(f.with_suffix(".tmp"), f)
    return [str(f) for f in files]


def _loader(
    *,
    tokenizer: str,
    files: list[str],
    cache: str | None,
    streaming: bool = False,
    rank: int = 0,
    world_size: int = 1,
    processes: int = 1,
    num_epochs: int | None = 1,
):
    """The benchmark's loader over ``files``: through the token store (built with ``processes``), or streamed."""
    from flame_gin.data import loader as loader_lib

    return loader_lib.build_loader(
        tokenizer=tokenizer,
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        rank=rank,
        world_size=world_size,
        seed=0,
        split="train",
        sources=[{"path": "json", "data_files": files, "streaming": streaming}],
        num_epochs=num_epochs,
        offline=not streaming,
        cache_dir=cache,
        store_processes=processes,
        tokenizer_audit_every=0,
    )


def measure_streaming(*, tokenizer: str, files: list[str], streams: int, corpus_bytes: int) -> dict:
    """Bytes read by ``streams`` block readers over one epoch, and a resume from the middle of the epoch."""
    plan = _loader(tokenizer=tokenizer, files=files, cache=None, streaming=True).plan
    started, per_stream, docs = time.perf_counter(), [], 0
    for g in range(streams):
        reader = plan.make_stream(stream=g, num_streams=streams, generation=0, state=None).readers[0]
        while texts := reader.read(4096)[1]:
            docs += len(texts)
        per_stream.append(reader.bytes_read)
    out = {
        "streams": streams,
        "blocks": len(plan.datasets[0]),
        "documents": docs,
        "bytes_read_over_corpus": round(sum(per_stream) / corpus_bytes, 4),
        "largest_stream_share": round(max(per_stream) / corpus_bytes, 4),
        "seconds": round(time.perf_counter() - started, 1),
    }
    reader = plan.make_stream(stream=0, num_streams=1, generation=0, state=None).readers[0]
    half = 0
    while half < docs // 2:
        half += len(reader.read(256)[1])
    saved = json.dumps({"readers": [reader.state_dict()]})  # a stream's state with nothing queued
    started = time.perf_counter()
    plan = _loader(tokenizer=tokenizer, files=files, cache=None, streaming=True, num_epochs=None).plan
    resumed = plan.make_stream(stream=0, num_streams=1, generation=0, state=json.loads(saved))
    batch = resumed.next_batch()
    out["resume"] = {
        "at_documents": half,
        "first_batch_s": round(time.perf_counter() - started, 2),
        "tokens": int(batch["input_ids"].size),
        "bytes_read_first": resumed.readers[0].bytes_read,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--paths", default="store,streaming", help="store, streaming, or both (comma-separated)")
    parser.add_argument("--cache_dir", default=str(pathlib.Path(tempfile.gettempdir()) / "flame_gin_data_bench"))
    args = parser.parse_args()
    from flame_gin.data import store

    cache = pathlib.Path(args.cache_dir)
    corpus = data_throughput.build_corpus(cache)
    tokenizer = data_throughput.build_tokenizer(cache, corpus)
    files = shard_corpus(
        corpus=corpus, out=cache / f"shards_{args.shards}x{args.repeat}", shards=args.shards, repeat=args.repeat
    )
    corpus_bytes = sum(os.path.getsize(f) for f in files)
    out = {"benchmark": "data_scale", "corpus_bytes": corpus_bytes, "shards": len(files), "cpus": os.cpu_count()}

    paths = set(args.paths.split(","))
    if "streaming" in paths:
        out["streaming"] = measure_streaming(
            tokenizer=tokenizer, files=files, streams=args.streams, corpus_bytes=corpus_bytes
        )
    if "store" not in paths:
        print(json.dumps(out))
        return
    with tempfile.TemporaryDirectory(prefix="stores_", dir=cache) as stores:
        started = time.perf_counter()
        built = _loader(tokenizer=tokenizer, files=files, cache=stores, rank=0, world_size=1, processes=args.processes)
        seconds = time.perf_counter() - started
        (token_store,) = built.stores()
        tokens = token_store.describe()["tokens"]
        ceiling = data_throughput.tokenizer_ceiling(corpus=corpus, tokenizer=tokenizer, seconds=10, fast=True)
        out["prepare"] = {
            "processes": args.processes,
            "seconds": round(seconds, 1),
            "tokens": tokens,
            "tokens_per_s": round(tokens / seconds),
            "tokens_per_s_per_process": round(tokens / seconds / args.processes),
            "bare_tokenizer_tokens_per_cpu_s": ceiling["tokens_per_cpu_s"],
            "per_process_over_bare": round(tokens / seconds / args.processes / ceiling["tokens_per_cpu_s"], 3),
        }

        fetched = [0]
        original = store.TokenStore.fetch

        def counting_fetch(self, indices):
            arrays = original(self, indices)
            fetched[0] += sum(len(a) for a in arrays) * self._tokens.dtype.itemsize
            return arrays

        store.TokenStore.fetch = counting_fetch
        try:
            started, batches = time.perf_counter(), 0
            for rank in range(args.streams):
                for _ in _loader(tokenizer=tokenizer, files=files, cache=stores, rank=rank, world_size=args.streams):
                    batches += 1
            read_seconds = time.perf_counter() - started
        finally:
            store.TokenStore.fetch = original
        store_bytes = os.path.getsize(pathlib.Path(token_store.directory) / store.TOKENS_FILE)
        out["read"] = {
            "streams": args.streams,
            "batches": batches,
            "bytes_read_over_store": round(fetched[0] / store_bytes, 4),
            "seconds": round(read_seconds, 1),
        }

        first = _loader(tokenizer=tokenizer, files=files, cache=stores, rank=0, world_size=1)
        it, seen = iter(first), 0
        while seen < tokens // 2:
            seen += int(next(it)["input_ids"].numel())
        state = first.state_dict()
        expected = next(it)["input_ids"]
        started = time.perf_counter()
        resumed = _loader(tokenizer=tokenizer, files=files, cache=stores, rank=0, world_size=1)
        resumed.load_state_dict(state)
        got = next(iter(resumed))["input_ids"]
        out["resume"] = {
            "at_tokens": seen,
            "first_batch_s": round(time.perf_counter() - started, 2),
            "same_batch": bool((got == expected).all()),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
