"""Data pipeline throughput: online tokenization + packing of a ~100 MB source-code corpus.

    python benchmarks/data_throughput.py [--workers=0,1,2] [--seconds=15] [--offline] [--cache_dir=...]

Builds (once, cached) a ~100 MB jsonl corpus from the Python source files installed on this machine (one
document per file, in sorted path order) and a 32K-vocabulary byte-level BPE tokenizer trained on its first
20 MB, then for each worker count runs ``build_loader`` with batches of 8 x 2048 in a fresh process and
reports build time, time to the first batch, tokens/s over the timed window and peak RSS (the process plus
its DataLoader workers). ``--offline`` adds the same runs reading a memory-mapped token store (built once
and cached; its build time is reported). The last line printed is one JSON object with every figure.

Each run also reports the CPU it got (``cores_used``: CPU-seconds of the process and its workers per second,
``main_process_cores`` for the main process alone) and ``tokens_per_cpu_s``, which stays meaningful on a
shared machine where wall-clock tokens/s only says how many cores the other processes left. The bare
tokenizers (HF's Rust tokenizer and the pipeline's exact fast BPE path) are measured the same way with one
thread and with all threads; their tokens per CPU-second is the pipeline's ceiling per core. Each worker
count runs with the fast path and, in the same benchmark, HF-only (``--compare_hf=0`` skips that), so the
JSON line carries ``fast_over_hf_same_run`` and ``reference_ratio`` (against flame's figures). The corpus's
bytes per token is printed so other tokenizers can be compared.

Measured on the 2-core CPU machine (8 x 2048; tables in benchmarks/RESULTS.md, "Data pipeline"): fast path
1.98-2.29 M / 1.76-2.29 M / 2.30-2.79 M tokens/s with 0 / 1 / 2 workers, 2.6-4.4x the HF-only pipeline of
the same run; RSS of main plus workers at most 1.2 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import site
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CORPUS_BYTES = 100_000_000
TOKENIZER_BYTES = 20_000_000
VOCAB = 32_000
SEQ_LEN, BATCH = 2048, 8
REFERENCE = {"1": 1_410_000, "2": 2_490_000}  # flame's pipeline on a 2-core machine, by DataLoader workers


def build_corpus(cache: pathlib.Path) -> pathlib.Path:
    """Writes ``corpus.jsonl`` of ~100 MB from installed ``.py`` files (cached)."""
    out = cache / "corpus.jsonl"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    roots = sorted({pathlib.Path(sys.base_prefix) / "lib", *map(pathlib.Path, site.getsitepackages())})
    files = sorted({f for r in roots for f in r.rglob("*.py")})
    tmp, written = out.with_suffix(".tmp"), 0
    with open(tmp, "w", encoding="utf-8") as f:
        for path in files:
            try:
                text = path.read_bytes().decode("utf-8", errors="replace")
            except OSError:
                continue
            if text.strip():
                line = json.dumps({"text": text}) + "\n"
                f.write(line)
                written += len(line)
            if written >= CORPUS_BYTES:
                break
    os.replace(tmp, out)
    return out


def build_tokenizer(cache: pathlib.Path, corpus: pathlib.Path) -> str:
    from flame_gin.data import embedded

    out = cache / f"bpe{VOCAB}"
    if (out / "tokenizer.json").exists():
        return str(out)

    embedded.train_bpe(texts=embedded.training_texts(corpus, TOKENIZER_BYTES), vocab_size=VOCAB, output_dir=out)
    return str(out)


def _cpu_seconds(proc) -> float:
    """CPU seconds (user + system) of ``proc`` and its live children (the DataLoader workers)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:  # a child that just exited
            pass
    return total


def measure(
    *, corpus: str, tokenizer: str, workers: int, seconds: float, cache: str, offline: bool, fast: bool
) -> dict:
    """One configuration, in this process: build, first batch, steady tokens/s, CPU used, peak RSS."""
    import psutil
    import torch

    from flame_gin.data import build_loader

    me = psutil.Process()
    t0 = time.perf_counter()
    loader = build_loader(
        tokenizer=tokenizer,
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        sources=[corpus],
        num_workers=workers,
        cache_dir=cache,
        seed=0,
        offline=offline,
        fast_tokenizer=fast,
    )
    t1 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    t2 = time.perf_counter()
    assert first["input_ids"].shape == (BATCH, SEQ_LEN) and first["input_ids"].dtype == torch.int64
    for _ in range(3):  # a few batches in before timing (the queues are not pre-filled: no inflated window)
        next(it)
    n, cpu0, main0, start = 0, _cpu_seconds(me), time.process_time(), time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(it)
        n += 1
    elapsed = time.perf_counter() - start
    cpu, main_cpu = _cpu_seconds(me) - cpu0, time.process_time() - main0
    rss_total = me.memory_info().rss + sum(c.memory_info().rss for c in me.children(recursive=True))
    rss_peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tokens = n * BATCH * SEQ_LEN
    return {
        "workers": workers,
        "offline": offline,
        "fast_tokenizer": fast,
        "build_s": round(t1 - t0, 3),
        "first_batch_s": round(t2 - t1, 3),
        "batches": n,
        "tokens_per_s": round(tokens / elapsed),
        "tokens_per_cpu_s": round(tokens / max(cpu, 1e-9)),
        "cores_used": round(cpu / elapsed, 2),
        "main_process_cores": round(main_cpu / elapsed, 2),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "peak_rss_main_mib": round(rss_peak_self / 2**20, 1),
        "rss_main_plus_workers_mib": round(rss_total / 2**20, 1),
    }


def tokenizer_ceiling(*, corpus: pathlib.Path, tokenizer: str, seconds: float, fast: bool) -> dict:
    """The bare tokenizer on a sample of the same documents (no reading, packing or state), in calls of
    32 documents, with this process's threads (RAYON_NUM_THREADS / TOKENIZERS_PARALLELISM decide): HF's Rust
    tokenizer, or with ``fast`` the pipeline's exact fast BPE path (audit off). Per CPU-second it is the speed
    of one core: the pipeline cannot beat it by more than the cores it uses."""
    import itertools
    import random

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(tokenizer, "tokenizer.json"))
    encode = lambda batch: [e.ids for e in tok.encode_batch_fast(batch, add_special_tokens=False)]  # noqa: E731
    if fast:
        from transformers import AutoTokenizer

        from flame_gin.data import fast_bpe

        encode, why = fast_bpe.compile_fast(AutoTokenizer.from_pretrained(tokenizer), audit_every=0)
        assert why is None, why
    with open(corpus, encoding="utf-8") as f:
        lines = list(itertools.islice(f, 0, None, 7))
    texts = [json.loads(x)["text"] for x in random.Random(0).sample(lines, min(len(lines), 2000))]
    n, nbytes, i = 0, 0, 0
    start, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        batch = texts[i % len(texts) : i % len(texts) + 32]
        n += sum(len(ids) for ids in encode(batch))
        nbytes += sum(len(t.encode("utf-8")) for t in batch)
        i += 32
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "tokens_per_s": round(n / wall),
        "tokens_per_cpu_s": round(n / cpu),
        "cores_used": round(cpu / wall, 2),
        "bytes_per_token": round(nbytes / n, 3),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--cache_dir", default=str(pathlib.Path.home() / ".cache" / "flame_gin" / "bench"))
    p.add_argument("--offline", action="store_true", help="also measure the offline token store")
    p.add_argument("--fast_tokenizer", type=int, default=1, help="1: exact fast BPE path (default), 0: HF only")
    p.add_argument("--compare_hf", type=int, default=1, help="also run each worker count HF-only (same run)")
    p.add_argument("--_one", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_offline", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--_ceiling", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    cache = pathlib.Path(os.path.expanduser(args.cache_dir))
    t = time.perf_counter()
    corpus = build_corpus(cache)
    tokenizer = build_tokenizer(cache, corpus)
    setup_s = time.perf_counter() - t
    if args._ceiling:
        print(
            json.dumps(
                tokenizer_ceiling(
                    corpus=corpus, tokenizer=tokenizer, seconds=min(args.seconds, 10.0), fast=args._ceiling == 2
                )
            )
        )
        return
    if args._one is not None:
        print(
            json.dumps(
                measure(
                    corpus=str(corpus),
                    tokenizer=tokenizer,
                    workers=args._one,
                    seconds=args.seconds,
                    cache=str(cache),
                    offline=bool(args._offline),
                    fast=bool(args.fast_tokenizer),
                )
            )
        )
        return
    print(f"load average at start: {os.getloadavg()}", flush=True)
    ceiling = {}
    one = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name, env, kind in [
        ("tokenizer_1_thread", one, 1),
        ("tokenizer_all_threads", {}, 1),
        ("fast_bpe_1_thread", one, 2),
        ("fast_bpe_all_threads", {}, 2),
    ]:
        out = subprocess.run(
            [sys.executable, __file__, f"--_ceiling={kind}", f"--seconds={args.seconds}", f"--cache_dir={cache}"],
            env={**os.environ, **env},
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        ceiling[name] = json.loads(out.strip().splitlines()[-1])
        print(f"bare tokenizer, {name}: {ceiling[name]}", flush=True)
    results = []
    workers = list(map(int, args.workers.split(",")))
    runs = [(w, 0, args.fast_tokenizer) for w in workers]
    runs += [(w, 0, 0) for w in workers] if args.fast_tokenizer and args.compare_hf else []
    runs += [(w, 1, args.fast_tokenizer) for w in workers] if args.offline else []
    for w, off, fast in runs:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                f"--_one={w}",
                f"--_offline={off}",
                f"--seconds={args.seconds}",
                f"--cache_dir={cache}",
                f"--fast_tokenizer={fast}",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(f"workers={w} offline={bool(off)} fast_tokenizer={bool(fast)}: {results[-1]}", flush=True)
    online = {(r["workers"], r["fast_tokenizer"]): r["tokens_per_s"] for r in results if not r["offline"]}
    summary = {
        "benchmark": "data_throughput",
        "corpus_mb": round(corpus.stat().st_size / 1e6, 1),
        "vocab": VOCAB,
        "batch": [BATCH, SEQ_LEN],
        "setup_s": round(setup_s, 1),
        "cpus": len(os.sched_getaffinity(0)),
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
        **ceiling,
        "results": results,
        "reference_tokens_per_s": REFERENCE,
        "reference_ratio": {
            w: round(online[int(w), bool(args.fast_tokenizer)] / v, 3)
            for w, v in REFERENCE.items()
            if (int(w), bool(args.fast_tokenizer)) in online
        },
        "fast_over_hf_same_run": {
            w: round(online[w, True] / online[w, False], 3)
            for w in workers
            if (w, True) in online and (w, False) in online
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
