"""Packing tokenized documents into fixed-size training batches, padded rows or one varlen row.

Documents (already split into pieces of at most ``context_len`` tokens) queue up in a ``Packer``. A batch of
``rows x seq_len`` takes the next ``rows * seq_len`` tokens plus one look-ahead token, so every token is the
label of the one before it exactly once and nothing is wasted; the look-ahead token stays queued as the
first input of the next batch.

In varlen mode the batch is a single row with ``cu_seqlens`` marking where each piece starts, and the label
of the last token of every piece that is followed by another piece is ``-100``: no document predicts the
first token of the next one, and FLA's varlen kernels reset their state at each boundary.
"""

from __future__ import annotations

import numpy as np

IGNORE = -100


class Packer:
    """A queue of token pieces (each tagged with its source index) cut into batches."""

    def __init__(self, *, num_sources: int):
        self._pieces: list[np.ndarray] = []
        self._sources: list[int] = []
        self._starts: list[bool] = []  # False for a piece cut by an earlier batch (a document's remainder)
        self.available = 0
        self.tokens_per_source = [0] * num_sources

    def push(self, pieces: list[np.ndarray], *, source: int) -> None:
        for p in pieces:
            if len(p):
                self._pieces.append(p)
                self._sources.append(source)
                self._starts.append(True)
                self.available += len(p)

    def batch(self, *, rows: int, seq_len: int, varlen: bool, pad_id: int) -> dict | None:
        """The next batch as numpy arrays, padded when the queue runs short; None when nothing is left."""
        n = rows * seq_len
        want = n + 1
        flat, starts, taken = [], [], 0
        for k, piece in enumerate(self._pieces):
            if taken >= want:
                break
            if self._starts[k]:
                starts.append(taken)
            part = piece[: want - taken]
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
        labels[:consumed] = flat[1:consumed + 1]
        out = {}
        if varlen:
            bounds = [s for s in starts if 0 < s <= consumed]
            for s in bounds:  # the token before a document start must not predict it
                labels[s - 1] = IGNORE
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
        while count:
            head = self._pieces[0]
            if len(head) <= count:
                self.tokens_per_source[self._sources[0]] += len(head)
                count -= len(head)
                self._pieces.pop(0)
                self._sources.pop(0)
                self._starts.pop(0)
            else:
                self.tokens_per_source[self._sources[0]] += count
                self._pieces[0] = head[count:]
                self._starts[0] = False
                count = 0

    def state_dict(self, *, as_lists: bool = True) -> dict:
        """Queued pieces as int lists (JSON-safe) or, cheaper for worker-to-loader transfer, array copies."""
        pieces = [p.tolist() if as_lists else p.copy() for p in self._pieces]
        return {"pieces": pieces, "sources": list(self._sources),
                "starts": list(self._starts), "tokens_per_source": list(self.tokens_per_source)}

    def load_state_dict(self, state: dict) -> None:
        self._pieces = [np.asarray(p, dtype=np.int32) for p in state["pieces"]]
        self._sources = list(state["sources"])
        self._starts = list(state["starts"])
        self.available = sum(len(p) for p in self._pieces)
        self.tokens_per_source = list(state["tokens_per_source"])
