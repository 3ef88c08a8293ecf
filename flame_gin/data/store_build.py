"""Building token stores: tokenizing with many processes, resumably, once per node; ingesting foreign arrays.

Why not ``datasets.map(num_proc=...)``: streaming sources (the hub corpora pre-training reads) are iterables
that ``map`` cannot split across processes, and a store must keep the source's document order exactly (the
trainer's global order is a function of document indices). So the builder reads the texts in order in one
process, hands chunks of documents to a pool of tokenizer processes (``imap`` keeps the order) and appends
the results.

Resumable: the store grows in parts (``part-<n>.bin`` tokens + ``part-<n>.npy`` document lengths, each written
under a temporary name and renamed), in a work folder named after the store. An interrupted build skips the
texts of the parts already written (reading text is cheap next to tokenizing) and goes on; the finished parts
are then joined into the store format (``flame_gin.data.store``) and the store is renamed into place. A lock
on the work folder lets one process build while the others (every rank of a node that starts with
``offline=True``) wait and then read the finished store.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import multiprocessing
import os
import pathlib
import shutil
from typing import Callable, Iterable

import numpy as np

from flame_gin.data import store

CHUNK_DOCS = 1024  # documents per tokenizer call (one pool task)
PART_CHUNKS = 64  # chunks per committed part: the work an interruption can lose
JOINED_FILE = "joined.json"  # in the work folder: the parts are joined, only the clean-up and rename are left


def _dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


_worker_tokenize = None


def _init_worker(make_tokenize) -> None:
    global _worker_tokenize
    _worker_tokenize = make_tokenize()


def _tokenize_in_worker(texts: list[str]) -> list[np.ndarray]:
    return _worker_tokenize(texts)


def _chunks(texts: Iterable[str]) -> Iterable[list[str]]:
    it = iter(texts)
    while chunk := list(itertools.islice(it, CHUNK_DOCS)):
        yield chunk


def _committed_parts(work: pathlib.Path) -> list[pathlib.Path]:
    parts = sorted(work.glob("part-*.npy"))
    return [p for p in parts if p.with_suffix(".bin").exists()]


def _write_part(*, work: pathlib.Path, index: int, arrays: list[np.ndarray], dtype) -> None:
    stem = work / f"part-{index:06d}"
    with open(f"{stem}.bin.tmp", "wb") as out:
        for ids in arrays:
            out.write(np.asarray(ids).astype(dtype).tobytes())
    np.save(f"{stem}.tmp.npy", np.asarray([len(a) for a in arrays], dtype=np.int64))
    os.rename(f"{stem}.bin.tmp", f"{stem}.bin")
    os.rename(f"{stem}.tmp.npy", f"{stem}.npy")  # the part counts once its lengths exist


def _join(*, work: pathlib.Path, parts: list[pathlib.Path], dtype, meta: dict) -> None:
    lengths = np.concatenate([np.load(p) for p in parts]) if parts else np.zeros(0, np.int64)
    if len(lengths) == 0:
        raise ValueError("the source has no documents")
    with open(work / store.TOKENS_FILE, "wb") as out:
        for p in parts:
            with open(p.with_suffix(".bin"), "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    np.save(work / store.OFFSETS_FILE, offsets)
    final = dict(meta, dtype=np.dtype(dtype).name, documents=len(lengths), tokens=int(offsets[-1]))
    (work / JOINED_FILE).write_text(json.dumps(final))  # from here on the parts are no longer needed
    _finish(work)


def _finish(work: pathlib.Path) -> None:
    """After the join (also when a crash interrupted what follows it): drop the parts, then write the meta."""
    if (work / JOINED_FILE).exists():
        for part in work.glob("part-*"):
            part.unlink()
        store.write_meta(work, **json.loads((work / JOINED_FILE).read_text()))
        (work / JOINED_FILE).unlink()


def build_store(
    *,
    texts: Iterable[str],
    make_tokenize: Callable[[], Callable[[list[str]], list[np.ndarray]]],
    vocab_size: int,
    directory: pathlib.Path,
    processes: int = 1,
    meta: dict | None = None,
) -> store.TokenStore:
    """The store at ``directory``, built from ``texts`` unless it exists. ``make_tokenize()`` (picklable, run
    once per process) returns the batch tokenizer; ``processes`` > 1 tokenizes in a pool of that size."""
    if store.is_store(directory):
        return store.TokenStore(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    work = directory.parent / f".{directory.name}.partial"
    work.mkdir(exist_ok=True)
    lock_path = directory.parent / f".{directory.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per store; the others wait, then read it
        if store.is_store(directory):
            return store.TokenStore(directory)
        if (work / JOINED_FILE).exists() or store.is_store(work):
            _finish(work)  # an earlier build got past its join: only the clean-up and the rename were left
            os.rename(work, directory)
            lock_path.unlink()
            return store.TokenStore(directory)
        dtype = _dtype(vocab_size)
        parts = _committed_parts(work)
        done = sum(len(np.load(p)) for p in parts)
        remaining = itertools.islice(iter(texts), done, None)  # skip what the parts already hold
        pool = None
        if processes > 1:
            ctx = multiprocessing.get_context("spawn")  # tokenizer threads do not survive a fork
            pool = ctx.Pool(processes, initializer=_init_worker, initargs=(make_tokenize,))
            results = pool.imap(_tokenize_in_worker, _chunks(remaining))
        else:
            tokenize = make_tokenize()
            results = (tokenize(chunk) for chunk in _chunks(remaining))
        try:
            index, pending, chunks = len(parts), [], 0
            for arrays in results:
                pending.extend(arrays)
                chunks += 1
                if chunks == PART_CHUNKS:
                    _write_part(work=work, index=index, arrays=pending, dtype=dtype)
                    index, pending, chunks = index + 1, [], 0
            if pending:
                _write_part(work=work, index=index, arrays=pending, dtype=dtype)
        finally:
            if pool is not None:
                pool.terminate()
        try:
            _join(work=work, parts=_committed_parts(work), dtype=dtype, meta=meta or {})
        except ValueError as e:
            raise ValueError(f"cannot build a token store in {directory}: {e}") from None
        os.rename(work, directory)
        lock_path.unlink()  # safe: whoever takes a lock from now on finds the store first
    return store.TokenStore(directory)


INGEST_BLOCK = 1 << 26  # tokens per block while ingesting (256 MiB of uint32)


def ingest(
    *,
    tokens: pathlib.Path,
    dtype: str,
    directory: pathlib.Path,
    offsets: pathlib.Path | None = None,
    separator: int | None = None,
) -> store.TokenStore:
    """A store at ``directory`` from a flat token array prepared elsewhere (raw ``dtype`` values, as numpy's
    ``tofile`` or nanoGPT-style ``.bin`` files write them): documents from ``offsets`` (a ``.npy`` of int64
    boundaries rising from 0 to the token count) or cut at every ``separator`` token, which is dropped (the
    loader adds the tokenizer's own BOS/EOS as configured). Read and written block by block; the folder appears
    only when complete."""
    if (offsets is None) == (separator is None):
        raise ValueError("ingest: give exactly one of offsets (a .npy of document boundaries) or separator")
    if dtype not in ("uint16", "uint32", "int32"):
        raise ValueError(f"ingest: dtype={dtype!r}; expected uint16, uint32 or int32")
    if store.is_store(directory) or directory.exists():
        raise FileExistsError(f"ingest: {directory} already exists")
    data = np.memmap(tokens, dtype=dtype, mode="r")
    if len(data) == 0:
        raise ValueError(f"ingest: {tokens} holds no tokens")
    if offsets is not None:
        bounds = np.load(offsets).astype(np.int64)
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != len(data) or np.any(np.diff(bounds) < 0):
            raise ValueError(
                f"ingest: {offsets} must rise from 0 to the token count {len(data)} of {tokens} "
                f"(got {len(bounds)} values, first {bounds[:1].tolist()}, last {bounds[-1:].tolist()})"
            )
    out_dtype = "uint32" if dtype == "int32" else dtype
    directory.parent.mkdir(parents=True, exist_ok=True)
    work = directory.parent / f".{directory.name}.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    kept, ends = 0, []
    with open(work / store.TOKENS_FILE, "wb") as out:
        for begin in range(0, len(data), INGEST_BLOCK):
            block = np.asarray(data[begin : begin + INGEST_BLOCK])
            if separator is not None:
                is_sep = block == separator
                ends.extend((kept + np.cumsum(~is_sep)[is_sep]).tolist())  # tokens kept before each separator
                block = block[~is_sep]
            out.write(block.astype(out_dtype).tobytes())
            kept += len(block)
    if separator is not None:
        bounds = np.asarray([0, *ends] + ([kept] if not ends or ends[-1] != kept else []), dtype=np.int64)
    np.save(work / store.OFFSETS_FILE, bounds)
    store.write_meta(
        work, dtype=out_dtype, documents=len(bounds) - 1, tokens=int(bounds[-1]), ingested_from=str(tokens)
    )
    os.rename(work, directory)
    return store.TokenStore(directory)
