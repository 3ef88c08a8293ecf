"""Packing tokenized documents into fixed-size training batches, padded rows or one varlen row.

Documents (with BOS/EOS) queue up in a ``Packer``. A batch of ``rows x seq_len`` takes the next
``rows * seq_len`` tokens plus one look-ahead token, so every token is the label of the one before it exactly
once and nothing is wasted; the look-ahead token stays queued as the first input of the next batch. A document
longer than ``context_len`` counts as several pieces cut every ``context_len`` tokens.

In varlen mode the batch is a single row with ``cu_seqlens`` marking where each piece starts, and the label
of the last token of every piece that is followed by another piece is ``-100``: no document predicts the
first token of the next one, and FLA's varlen kernels reset their state at each boundary.

State: a queued document is saved as a reference (source, position) when its reader can fetch it again, and
as its tokens otherwise (streaming sources), with the count of its tokens already delivered; so reading far
ahead (large tokenizer batches) keeps checkpoints small.
"""

from __future__ import annotations

import numpy as np

IGNORE = -100


class Packer:
    """A queue of documents (token arrays tagged with source and optional reference) cut into batches."""

    def __init__(self, *, num_sources: int, context_len: int):
        self._docs: list[np.ndarray] = []
        self._sources: list[int] = []
        self._refs: list = []  # (source, position) or None when the document cannot be fetched again
        self._offsets: list[int] = []  # tokens of each document already delivered (non-zero at the head)
        self._context_len = context_len
        self.available = 0
        self.tokens_per_source = [0] * num_sources

    def push(self, doc: np.ndarray, *, source: int, ref) -> None:
        if len(doc):
            self._docs.append(doc)
            self._sources.append(source)
            self._refs.append(ref)
            self._offsets.append(0)
            self.available += len(doc)

    def batch(self, *, rows: int, seq_len: int, varlen: bool, pad_id: int) -> dict | None:
        """The next batch as numpy arrays, padded when the queue runs short; None when nothing is left."""
        n = rows * seq_len
        want = n + 1
        flat, starts, taken = [], [], 0
        for doc, off in zip(self._docs, self._offsets):
            if taken >= want:
                break
            part = doc[off : off + want - taken]
            first_cut = -(-off // self._context_len) * self._context_len  # first piece start at or after off
            starts.extend(taken + c - off for c in range(first_cut, off + len(part), self._context_len))
            flat.append(part)
            taken += len(part)
        if taken <= 1:
            return None
        flat = np.concatenate(flat).astype(np.int64, copy=False)
        consumed = min(n, taken - 1)
        self._consume(consumed)
        inputs = np.full(n, pad_id, dtype=np.int64)
        labels = np.full(n, IGNORE, dtype=np.int64)
        inputs[:consumed] = flat[:consumed]
        labels[:consumed] = flat[1 : consumed + 1]
        out = {}
        if varlen:
            bounds = [s for s in starts if 0 < s <= consumed]
            labels[np.asarray(bounds, dtype=np.int64) - 1] = IGNORE  # no piece predicts the next one's start
            cuts = [0] + [s for s in bounds if s < consumed] + [consumed]
            if consumed < n:
                cuts.append(n)
            out["cu_seqlens"] = np.asarray(cuts, dtype=np.int32)
            out["input_ids"], out["labels"] = inputs[None, :], labels[None, :]
        else:
            out["input_ids"], out["labels"] = inputs.reshape(rows, seq_len), labels.reshape(rows, seq_len)
        return out

    def _consume(self, count: int) -> None:
        """Drops ``count`` tokens from the queue front, crediting them to their sources."""
        self.available -= count
        drop = 0
        while count:
            left = len(self._docs[drop]) - self._offsets[drop]
            used = min(left, count)
            self.tokens_per_source[self._sources[drop]] += used
            count -= used
            if used == left:
                drop += 1
            else:
                self._offsets[drop] += used
        if drop:
            del self._docs[:drop], self._sources[:drop], self._refs[:drop], self._offsets[:drop]

    def state_dict(self) -> dict:
        entries = []
        for doc, s, ref, off in zip(self._docs, self._sources, self._refs, self._offsets):
            if ref is not None:
                entries.append({"source": s, "position": ref[1], "offset": off})
            else:
                entries.append({"source": s, "tokens": doc[off:].tolist(), "offset": 0})
        return {"docs": entries, "tokens_per_source": list(self.tokens_per_source)}

    def load_state_dict(self, state: dict, *, refetch) -> None:
        """Restores the queue; ``refetch(list of (source, position))`` returns those documents' token arrays."""
        entries = state["docs"]
        wanted = [(e["source"], e["position"]) for e in entries if "position" in e]
        fetched = iter(refetch(wanted) if wanted else [])
        self._docs, self._sources, self._refs, self._offsets = [], [], [], []
        for e in entries:
            if "position" in e:
                doc, ref = next(fetched), (e["source"], e["position"])
            else:
                doc, ref = np.asarray(e["tokens"], dtype=np.int32), None
            self._docs.append(doc)
            self._sources.append(e["source"])
            self._refs.append(ref)
            self._offsets.append(e["offset"])
        self.available = sum(len(d) - o for d, o in zip(self._docs, self._offsets))
        self.tokens_per_source = list(state["tokens_per_source"])
