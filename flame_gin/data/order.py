"""Which document positions a reading stream owns, and how ownership moves when the streams change.

Every source defines one global order of documents, indexed by an integer *position* that runs on across
epochs (position ``p`` is item ``p % n`` of epoch ``p // n``). The loader's streams (data-parallel ranks times
DataLoader workers) split that order between them: a cursor owns the positions ``p >= base`` with
``(p - base) % stride == residue`` and walks them in increasing order, passing over the positions listed
in ``skip`` (already consumed under an earlier layout).

Resuming with a different number of streams (other ranks or workers) rebuilds the cursors with
``reshard``: everything below the smallest old ``next`` was consumed by someone, and each consumed position
above it becomes a ``skip`` entry of the new cursor that owns it. So no document is read twice and none is
skipped: the granularity is one document. Cursors are plain dicts so they travel in checkpoints.
"""

from __future__ import annotations

import numpy as np


def new_cursor(*, stream: int, num_streams: int, base: int = 0, skip=()) -> dict:
    """The cursor of stream ``stream`` out of ``num_streams`` for positions from ``base`` on."""
    skip = sorted(p for p in skip if p >= base and (p - base) % num_streams == stream)
    return {"base": base, "stride": num_streams, "residue": stream, "next": base + stream, "skip": skip}


def take(cursor: dict) -> int:
    """Returns the cursor's next owned, unconsumed position and advances past it (mutates ``cursor``)."""
    p, skip, stride = cursor["next"], cursor["skip"], cursor["stride"]
    while skip and skip[0] <= p:
        if skip.pop(0) == p:
            p += stride
    cursor["next"] = p + stride
    return p


def peek(cursor: dict) -> int:
    """The position ``take`` would return, without advancing."""
    p = cursor["next"]
    for s in cursor["skip"]:
        if s == p:
            p += cursor["stride"]
        elif s > p:
            break
    return p


def reshard(cursors: list[dict], *, num_streams: int) -> list[dict]:
    """New cursors for ``num_streams`` streams that continue exactly where ``cursors`` (all old streams) left off."""
    if not cursors:
        raise ValueError("reshard needs the cursors of every old stream, got none")
    new_base = min(peek(c) for c in cursors)
    consumed = []
    for c in cursors:
        first = c["base"] + c["residue"]
        if first < new_base:  # align to the first owned position at or above new_base
            first += -(-(new_base - first) // c["stride"]) * c["stride"]
        consumed.extend(range(first, c["next"], c["stride"]))
        consumed.extend(p for p in c["skip"] if p >= c["next"])
    consumed = sorted(set(consumed))
    return [new_cursor(stream=s, num_streams=num_streams, base=new_base, skip=consumed) for s in range(num_streams)]


def permutation(*, n: int, seed: int, source: int, epoch: int) -> np.ndarray:
    """The exact (map-style) shuffle of epoch ``epoch``: a seeded permutation of ``range(n)``."""
    rng = np.random.Generator(np.random.PCG64([seed, source, epoch, 0x5EED]))
    return rng.permutation(n)


class EpochOrder:
    """Position -> (epoch, item) of a source of ``n`` items: ``permutation`` of each epoch when ``shuffle``, the
    stored order otherwise; the current epoch's permutation is kept, since positions are read in order."""

    def __init__(self, *, n: int, seed: int, source: int, shuffle: bool):
        self._n, self._seed, self._source, self._shuffle = n, seed, source, shuffle
        self._epoch, self._perm = -1, None

    def __call__(self, p: int) -> tuple[int, int]:
        epoch, i = divmod(p, self._n)
        if not self._shuffle:
            return epoch, i
        if epoch != self._epoch:
            self._perm = permutation(n=self._n, seed=self._seed, source=self._source, epoch=epoch)
            self._epoch = epoch
        return epoch, int(self._perm[i])
