"""One reading stream: a seeded mixture over sources, online tokenization, and packing into batches.

A loader runs one stream per DataLoader worker (or one in the main process without workers). Each document
is drawn from a source chosen with the mixture probabilities by the stream's own RNG (one uniform draw per
document, so reading ahead in chunks never changes the choices), tokenized in batches through the fast
(Rust) tokenizer, wrapped in BOS/EOS, cut into pieces of at most ``context_len`` tokens, and queued for
packing. ``state_dict`` captures the source cursors and shuffle buffers, the mixture RNG and the queued
tokens, so a stream rebuilt from it continues with identical batches.

Read-ahead. When the tokenizer encodes on background threads (the fast BPE path with more than one thread),
``next_batch`` starts, after returning a batch, the very read that the next call would begin with, so the
threads tokenize while the caller trains or ships the batch. Until the next call collects it,
``state_dict`` is the snapshot taken before that read: a stream restored from it makes the same read, so
batches and resume are exactly those of the synchronous order.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from flame_gin.data.packing import Packer

_MAX_READ_AHEAD = 512
_READ_AHEAD = 2.0  # read about two batches' worth of tokens at a time (queued documents are saved by reference)


class _Done:
    """An already computed result, with the interface of a pending one."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


class Tokenize:
    """Texts to token arrays (no special tokens added): through ``fast`` (an exact ``fast_bpe.FastBPE``) when
    given, else through the tokenizer's Rust backend when it has one."""

    def __init__(self, tokenizer, *, fast=None):
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._tokenizer, self._fast = tokenizer, fast

    @property
    def runs_in_background(self) -> bool:
        return self._fast is not None and self._fast.threads() > 1

    def submit(self, texts: list[str]):
        """Starts encoding ``texts``; ``.result()`` gives what ``self(texts)`` would."""
        if self.runs_in_background:
            return self._fast.submit(texts)
        return _Done(self(texts))

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        if self._fast is not None:
            return self._fast(texts)
        if self._backend is not None:
            encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
            encs = encode(texts, add_special_tokens=False)
            return [np.asarray(e.ids, dtype=np.int32) for e in encs]
        ids = self._tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [np.asarray(x, dtype=np.int32) for x in ids]


def with_specials(ids: np.ndarray, *, bos: int | None, eos: int | None) -> np.ndarray:
    """One document's tokens wrapped in BOS/EOS (either may be None)."""
    parts = [ids]
    if bos is not None:
        parts.insert(0, np.asarray([bos], dtype=np.int32))
    if eos is not None:
        parts.append(np.asarray([eos], dtype=np.int32))
    return np.concatenate(parts) if len(parts) > 1 else ids


class DocStream:
    """Mixture -> tokenize -> pack for one stream; ``next_batch()`` returns numpy arrays or None at the end."""

    def __init__(
        self,
        *,
        readers: list,
        tokenized: list[bool],
        tokenize,
        probabilities: list[float],
        bos: int | None,
        eos: int | None,
        context_len: int,
        seq_len: int,
        rows: int,
        varlen: bool,
        pad_id: int,
        mixture_seed: list[int],
        min_read_ahead: int = 8,
        state: dict | None = None,
    ):
        self._readers, self._tokenized, self._tokenize = readers, tokenized, tokenize
        self._min_read_ahead = min_read_ahead  # documents per tokenizer call at least (keeps its threads busy)
        self._probs = np.asarray(probabilities, dtype=np.float64)
        self._active = [True] * len(readers)
        self._bos, self._eos, self._context_len = bos, eos, context_len
        self._seq_len, self._rows, self._varlen, self._pad_id = seq_len, rows, varlen, pad_id
        self._packer = Packer(num_sources=len(readers), context_len=context_len)
        self._rng = np.random.Generator(np.random.PCG64(mixture_seed))
        self._tokens_per_doc = float(rows * seq_len + 1)  # first read: a few documents, then adapt
        self._ahead, self._snapshot = None, None  # the read started after the last batch (see module docstring)
        if state is not None:
            self._packer.load_state_dict(state["packer"], refetch=self._refetch)
            self._rng.bit_generator.state = state["rng"]
            self._active = list(state["active"])
            self._tokens_per_doc = state["tokens_per_doc"]

    def _choose(self, k: int) -> list[int]:
        probs = np.where(self._active, self._probs, 0.0)
        cdf = np.cumsum(probs / probs.sum())
        draws = self._rng.random(k)
        return np.minimum(np.searchsorted(cdf, draws, side="right"), len(cdf) - 1).tolist()

    def _specials(self, ids: list[np.ndarray]) -> list[np.ndarray]:
        return [with_specials(x, bos=self._bos, eos=self._eos) for x in ids]

    def _payload_tokens(self, s: int, payloads: list) -> list[np.ndarray]:
        return self._specials(payloads if self._tokenized[s] else self._tokenize(list(payloads)))

    def _refetch(self, refs: list) -> list[np.ndarray]:
        """Token arrays of queued documents saved by reference, fetched and tokenized again."""
        out = [None] * len(refs)
        for s in sorted({s for s, _ in refs}):
            idx = [i for i, (src, _) in enumerate(refs) if src == s]
            docs = self._payload_tokens(s, self._readers[s].fetch_at([refs[i][1] for i in idx]))
            for i, d in zip(idx, docs):
                out[i] = d
        return out

    def _read(self, need: int):
        """One read of the fill loop: mixture draws, documents from the sources, tokenization started."""
        k = math.ceil(_READ_AHEAD * (need - self._packer.available) / self._tokens_per_doc)
        choices = self._choose(min(_MAX_READ_AHEAD, max(self._min_read_ahead, k)))
        reads = {}
        for s in sorted(set(choices)):
            wanted = choices.count(s)
            positions, got = self._readers[s].read(wanted)
            if len(got) < wanted:
                self._active[s] = False
                # draws past the exhaustion point are dropped so the survivors stay in draw order
            refs = [(s, p) if self._readers[s].refetchable else None for p in positions]
            pending = _Done(list(got)) if self._tokenized[s] or not got else self._tokenize.submit(list(got))
            reads[s] = (refs, pending)
        return choices, reads

    def _push(self, choices: list[int], reads: dict) -> None:
        docs = {s: list(zip(refs, self._specials(pending.result()))) for s, (refs, pending) in reads.items()}
        new_tokens, new_docs = 0, 0
        for s in choices:
            if not docs[s]:
                continue
            ref, doc = docs[s].pop(0)
            self._packer.push(doc, source=s, ref=ref)
            new_tokens += len(doc)
            new_docs += 1
        if new_docs:
            self._tokens_per_doc = 0.5 * self._tokens_per_doc + 0.5 * (new_tokens / new_docs)

    def _fill(self, need: int) -> None:
        if self._ahead is not None:
            (choices, reads), self._ahead, self._snapshot = self._ahead, None, None
            self._push(choices, reads)
        while self._packer.available < need and any(self._active):
            self._push(*self._read(need))

    def next_batch(self) -> dict | None:
        need = self._rows * self._seq_len + 1
        self._fill(need)
        batch = self._packer.batch(rows=self._rows, seq_len=self._seq_len, varlen=self._varlen, pad_id=self._pad_id)
        if (
            batch is not None
            and self._tokenize.runs_in_background
            and self._packer.available < need
            and any(self._active)
        ):
            self._snapshot = self._state()
            self._ahead = self._read(need)
        return batch

    @property
    def readers(self) -> list:
        """The source readers, in source order (their ``bytes_read`` tells what a stream fetched)."""
        return list(self._readers)

    @property
    def tokens_per_source(self) -> list[int]:
        return list(self._packer.tokens_per_source)

    def state_dict(self) -> dict:
        """A copy of everything needed to continue exactly (plain Python, JSON-serialisable)."""
        return copy.deepcopy(self._snapshot) if self._ahead is not None else self._state()

    def _state(self) -> dict:
        return copy.deepcopy(
            {
                "readers": [r.state_dict() for r in self._readers],
                "packer": self._packer.state_dict(),
                "rng": self._rng.bit_generator.state,
                "active": list(self._active),
                "tokens_per_doc": self._tokens_per_doc,
            }
        )
