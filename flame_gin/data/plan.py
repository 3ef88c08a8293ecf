"""Everything a reading stream needs, checked once in the main process and shipped to DataLoader workers.

``make_plan`` resolves the tokenizer, opens every source (or its offline token store), validates the mixture
and the options, and raises early with the value at fault named. A ``Plan`` is picklable (opened datasets
pickle as references to their memory-mapped Arrow files) and builds ``DocStream`` objects from plain state.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import os
import pathlib

from flame_gin.data import embedded, fast_bpe, order, readers, rows, shards, store, store_build
from flame_gin.data import sources as sources_lib
from flame_gin.data.stream import DocStream, Tokenize

_TOKENIZERS: dict = {}
_TOKENIZE: dict = {}


def load_tokenizer(path: str):
    """Loads (once per process) an HF tokenizer; ``"embedded"`` means the embedded default's tokenizer."""
    if path not in _TOKENIZERS:
        from transformers import AutoTokenizer

        if path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(path)):
            raise FileNotFoundError(f"tokenizer path {path!r} is not a directory")
        try:
            _TOKENIZERS[path] = AutoTokenizer.from_pretrained(os.path.expanduser(path))
        except Exception as e:  # OSError, a broken tokenizer file, or a repo that holds no tokenizer
            what = (
                "a local directory that holds no loadable tokenizer"
                if os.path.isdir(os.path.expanduser(path))
                else "neither a local tokenizer directory nor loadable from the Hugging Face Hub"
            )
            reason = (str(e).splitlines() or [""])[0]
            raise ValueError(
                f"tokenizer {path!r} (flame_gin.build_loader.tokenizer): {what} ({type(e).__name__}: {reason})"
            ) from e
    return _TOKENIZERS[path]


def load_tokenize(path: str, *, fast: bool, audit_every: int) -> Tokenize:
    """The per-process text -> ids function for ``path``: the exact fast BPE path when ``fast`` and the
    tokenizer qualifies (see ``fast_bpe``), else the HF tokenizer; why the fast path is off is logged once."""
    key = (path, fast, audit_every)
    if key not in _TOKENIZE:
        tok, fast_path = load_tokenizer(path), None
        if fast:
            fast_path, why = fast_bpe.compile_fast(tok, audit_every=audit_every)
            if fast_path is None:
                logging.info("tokenizer %s: HF tokenization (fast BPE path off: %s)", path, why)
        _TOKENIZE[key] = Tokenize(tok, fast=fast_path)
    return _TOKENIZE[key]


@dataclasses.dataclass
class Plan:
    tokenizer_path: str
    sources: list
    datasets: list
    kinds: list  # "map" (datasets.Dataset), "store" (TokenStore), "blocks" (shards.Blocks), "stream" (IterableDataset)
    probabilities: list
    seq_len: int
    rows: int
    varlen: bool
    context_len: int
    bos: int | None
    eos: int | None
    pad_id: int
    seed: int
    shuffle: bool
    buffer_size: int
    num_epochs: int | None
    read_ahead_docs: int = 8
    fast_tokenizer: bool = True
    audit_every: int = 256

    def tokenize(self) -> Tokenize:
        return load_tokenize(self.tokenizer_path, fast=self.fast_tokenizer, audit_every=self.audit_every)

    def fresh_reader_state(self, *, source: int, stream: int, num_streams: int) -> dict:
        st = {"cursor": order.new_cursor(stream=stream, num_streams=num_streams)}
        if self.kinds[source] == "stream":
            st["shuffle"] = None
        if self.kinds[source] == "blocks":
            st["partial"] = []
        return st

    def check_reader_state(self, *, source: int, state: dict) -> None:
        """Raises when a saved reader state is not of the kind this source is read with now (a run saved while
        a streaming source was replayed, resumed where it is read by blocks, or the other way round)."""
        kind, saved = self.kinds[source], "blocks" if "partial" in state else "stream" if "shuffle" in state else "map"
        if (kind == "store" and saved == "map") or kind == saved:
            return
        raise ValueError(
            f"data source {self.sources[source].display_name!r}: the saved loader state reads it as {saved!r}, "
            f"this loader as {kind!r} (a checkpoint from another version or another source setting); resume with "
            "the settings it was saved with, or start the data afresh with a new run directory"
        )

    def _reader(self, s: int, state: dict):
        ds, kind = self.datasets[s], self.kinds[s]
        if kind == "blocks":
            return readers.BlockReader(
                blocks=ds,
                seed=self.seed,
                source=s,
                shuffle=self.shuffle,
                num_epochs=self.num_epochs,
                cursor=state["cursor"],
                partial=state["partial"],
            )
        if kind == "stream":
            field = self.sources[s].text_field

            def open_iter(ds=ds, field=field):
                return (t for batch in ds.iter(batch_size=256) for t in batch[field])

            return readers.StreamReader(
                open_iter=open_iter,
                seed=self.seed,
                source=s,
                buffer_size=self.buffer_size if self.shuffle else 1,
                num_epochs=self.num_epochs,
                cursor=state["cursor"],
                shuffle_state=state.get("shuffle"),
            )
        if kind == "store":
            fetch = ds.fetch
        else:
            field = self.sources[s].text_field

            def fetch(indices, ds=ds, field=field):
                return ds[indices][field]

        return readers.MapReader(
            fetch=fetch,
            size=len(ds),
            seed=self.seed,
            source=s,
            shuffle=self.shuffle,
            num_epochs=self.num_epochs,
            cursor=state["cursor"],
        )

    def make_stream(self, *, stream: int, num_streams: int, generation: int, state: dict | None) -> DocStream:
        """The stream with global id ``stream``; ``state`` None means fresh, a dict continues exactly."""
        state = copy.deepcopy(state)
        reader_states = (
            state["readers"]
            if state
            else [
                self.fresh_reader_state(source=s, stream=stream, num_streams=num_streams)
                for s in range(len(self.sources))
            ]
        )
        reader_objs = [self._reader(s, st) for s, st in enumerate(reader_states)]
        return DocStream(
            readers=reader_objs,
            tokenized=[k == "store" for k in self.kinds],
            tokenize=self.tokenize(),
            probabilities=self.probabilities,
            bos=self.bos,
            eos=self.eos,
            context_len=self.context_len,
            seq_len=self.seq_len,
            rows=self.rows,
            varlen=self.varlen,
            pad_id=self.pad_id,
            mixture_seed=[self.seed, stream, num_streams, generation],
            min_read_ahead=self.read_ahead_docs,
            state=state if state and "packer" in state else None,
        )


def _as_source(x) -> sources_lib.Source:
    if isinstance(x, sources_lib.Source):
        return x
    if isinstance(x, dict):
        return sources_lib.source(**x)
    if isinstance(x, (str, os.PathLike)):
        return sources_lib.source(path=str(x))
    raise TypeError(f"a data source must be a Source, a dict of its fields or a path, got {x!r}")


def embedded_source(*, cache_dir=None) -> sources_lib.Source:
    """The embedded default corpus as a ``Source`` (built on first use)."""
    d = embedded.corpus_dir(cache_dir=cache_dir)
    return sources_lib.source(
        path="json",
        data_files={"train": str(d / "train.jsonl"), "validation": str(d / "validation.jsonl")},
        label="stdlib",
    )


def _check_probabilities(probabilities, n: int) -> list[float]:
    if probabilities is None:
        return [1.0 / n] * n
    probabilities = [float(p) for p in probabilities]
    if len(probabilities) != n:
        raise ValueError(f"probabilities={probabilities} has {len(probabilities)} entries for {n} sources")
    if any(p < 0 or not math.isfinite(p) for p in probabilities):
        raise ValueError(f"probabilities={probabilities} must be finite and non-negative")
    if abs(sum(probabilities) - 1.0) > 1e-6:
        raise ValueError(f"probabilities={probabilities} sum to {sum(probabilities)}, not 1")
    return probabilities


def _prepared_store(src, *, split: str) -> store.TokenStore | None:
    """The store of ``split`` when ``src.path`` is a prepared corpus folder (``<path>/<split name>``, written by
    ``python -m flame_gin.data.prepare``); None for a text source."""
    folder = pathlib.Path(str(src.path))
    if not (folder.is_dir() and any(store.is_store(child) for child in folder.iterdir() if child.is_dir())):
        return None
    if src.holdout:
        raise ValueError(
            f"data source {src.path!r} is a prepared token-store folder: holdout={src.holdout} needs the texts; "
            f"prepare a '{src.validation_split}' store beside '{src.train_split}' instead"
        )
    name = sources_lib.split_name(src, split)
    if not store.is_store(folder / name):
        found = sorted(c.name for c in folder.iterdir() if store.is_store(c))
        raise ValueError(f"data source {src.path!r}: no '{name}' store for split {split!r} (it holds {found})")
    return store.TokenStore(folder / name)


def make_plan(
    *,
    tokenizer: str,
    seq_len: int,
    batch_size: int,
    seed: int,
    split: str,
    sources,
    probabilities,
    context_len,
    add_bos,
    add_eos,
    varlen,
    shuffle,
    buffer_size,
    num_epochs,
    offline,
    cache_dir,
    num_workers: int = 0,
    fast_tokenizer: bool = True,
    audit_every: int = 256,
    bad_rows: str = "stop",
    store_processes: int = 1,
    block_bytes: int = 1 << 22,
) -> Plan:
    """Resolves and validates every option; opens the sources. Raises before any model is built."""
    if seq_len <= 0 or batch_size <= 0:
        raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be positive")
    rows.check_mode(bad_rows)
    if tokenizer == "embedded":
        tokenizer = embedded.tokenizer_path(cache_dir=cache_dir)
    tok = load_tokenizer(str(tokenizer))
    if fast_tokenizer:  # built once here, so forked DataLoader workers inherit it instead of rebuilding it
        load_tokenize(str(tokenizer), fast=True, audit_every=audit_every)
    srcs = [embedded_source(cache_dir=cache_dir)] if sources is None else [_as_source(x) for x in sources]
    if not srcs:
        raise ValueError("sources is empty: give at least one data source")
    probs = _check_probabilities(probabilities, len(srcs))
    bos = tok.bos_token_id if (add_bos is None or add_bos) else None
    if add_bos and bos is None:
        raise ValueError(f"add_bos=True but tokenizer {tokenizer!r} has no BOS token")
    eos = tok.eos_token_id if add_eos else None
    if add_eos and eos is None:
        raise ValueError(f"add_eos=True but tokenizer {tokenizer!r} has no EOS token")
    pad = next((t for t in (tok.pad_token_id, tok.eos_token_id, 0) if t is not None))
    context_len = seq_len if context_len is None else int(context_len)
    if context_len <= 0:
        raise ValueError(f"context_len={context_len} must be positive")
    training = split == "train"
    hf_cache = None if cache_dir is None else str(pathlib.Path(cache_dir) / "hf_datasets")
    datasets_, kinds = [], []
    for s, src in enumerate(srcs):
        prepared = _prepared_store(src, split=split)
        if prepared is not None:
            datasets_.append(prepared)
            kinds.append("store")
            continue
        ds = sources_lib.open_split(src, split=split, cache_dir=hf_cache, bad_rows=bad_rows)
        if offline:
            key = store.store_key(
                description={**dataclasses.asdict(src), "split": split}, tokenizer_path=str(tokenizer)
            )
            base = pathlib.Path(cache_dir) if cache_dir else embedded.default_cache_dir()
            texts = (t for batch in ds.iter(batch_size=256) for t in batch[src.text_field])
            ds = store_build.build_store(
                texts=texts,
                make_tokenize=functools.partial(
                    load_tokenize, str(tokenizer), fast=fast_tokenizer, audit_every=audit_every
                ),
                vocab_size=len(tok),
                directory=base / "token_stores" / key,
                processes=store_processes,
                meta={"source": src.display_name, "split": split, "tokenizer": str(tokenizer)},
            )
            kinds.append("store")
        elif src.streaming:
            blocks, why = shards.resolve(
                src, split=split, block_bytes=block_bytes, bad_rows=bad_rows, cache_dir=hf_cache
            )
            if blocks is None:
                logging.info("data source %s: every stream reads the whole stream (%s)", src.display_name, why)
            else:
                ds = blocks
            kinds.append("stream" if blocks is None else "blocks")
        else:
            kinds.append("map")
        datasets_.append(ds)
    return Plan(
        tokenizer_path=str(tokenizer),
        sources=srcs,
        datasets=datasets_,
        kinds=kinds,
        probabilities=probs,
        seq_len=seq_len,
        rows=batch_size,
        varlen=varlen,
        context_len=context_len,
        bos=bos,
        eos=eos,
        pad_id=pad,
        seed=seed,
        shuffle=training if shuffle is None else bool(shuffle),
        buffer_size=buffer_size,
        num_epochs=(None if training else 1) if num_epochs is None else num_epochs,
        # One stream per process gets all tokenizer threads: bigger calls balance them (measured +10-25%
        # on 2 cores); with several workers, small calls keep the round-robin hand-off smooth.
        read_ahead_docs=32 if num_workers <= 1 else 8,
        fast_tokenizer=fast_tokenizer,
        audit_every=audit_every,
    )
