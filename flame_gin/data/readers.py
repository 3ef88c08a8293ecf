"""Reading documents of one source in the source's global order, for one stream, with resumable state.

``MapReader`` serves a random-access (map-style) source: the global order of epoch ``e`` is an exact seeded
permutation (or the stored order when shuffling is off), and the stream's cursor picks its positions.

``StreamReader`` serves a streaming source: every stream replays the same seeded buffer shuffle of the
underlying stream and keeps only the positions its cursor owns (parsing is cheap next to tokenizing, and it
makes the order independent of the number of streams, which is what lets resume change that number).
Its state holds the underlying example count, the ids of the examples in the shuffle buffer and the RNG
state; restoring re-reads the current epoch up to that count (cost linear in the epoch position).
"""

from __future__ import annotations

import numpy as np

from flame_gin.data import order


class MapReader:
    """Documents of a map-style source; ``fetch(indices)`` returns their payloads (texts or token arrays)."""

    def __init__(
        self, *, fetch, size: int, seed: int, source: int, shuffle: bool, num_epochs: int | None, cursor: dict
    ):
        self._fetch, self._n, self._seed, self._source = fetch, size, seed, source
        self._shuffle = shuffle
        self._limit = None if num_epochs is None else num_epochs * size
        self.cursor = cursor
        self._perm_epoch, self._perm = -1, None

    def _index(self, p: int) -> int:
        epoch, i = divmod(p, self._n)
        if not self._shuffle:
            return i
        if epoch != self._perm_epoch:
            self._perm = order.permutation(n=self._n, seed=self._seed, source=self._source, epoch=epoch)
            self._perm_epoch = epoch
        return int(self._perm[i])

    refetchable = True

    def read(self, k: int) -> tuple[list[int], list]:
        """Positions and payloads of up to ``k`` next documents (fewer only when the source is exhausted)."""
        positions = []
        while len(positions) < k:
            if self._limit is not None and order.peek(self.cursor) >= self._limit:
                break
            positions.append(order.take(self.cursor))
        return positions, self.fetch_at(positions)

    def fetch_at(self, positions: list[int]) -> list:
        """Payloads of the documents at global ``positions`` (any stream's), without moving the cursor."""
        return self._fetch([self._index(p) for p in positions]) if positions else []

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}


class StreamReader:
    """Documents of a streaming source through a seeded shuffle buffer shared (replayed) by all streams."""

    def __init__(
        self,
        *,
        open_iter,
        seed: int,
        source: int,
        buffer_size: int,
        num_epochs: int | None,
        cursor: dict,
        shuffle_state: dict | None = None,
    ):
        self._open_iter, self._buffer_size = open_iter, max(1, buffer_size)
        self._num_epochs = num_epochs
        self.cursor = cursor
        if shuffle_state is None:
            rng = np.random.Generator(np.random.PCG64([seed, source, 0xB0F]))
            shuffle_state = {
                "epoch": 0,
                "n_read": 0,
                "buffer": [],
                "rng": rng.bit_generator.state,
                "pos": 0,
                "draining": False,
            }
        self._restore(shuffle_state)

    def _restore(self, st: dict) -> None:
        self._epoch, self._n_read, self._pos = st["epoch"], st["n_read"], st["pos"]
        self._draining = st["draining"]
        self._rng = np.random.Generator(np.random.PCG64())
        self._rng.bit_generator.state = st["rng"]
        self._it = self._open_iter()
        wanted, texts = set(st["buffer"]), {}
        for i in range(self._n_read):
            text = next(self._it)
            if i in wanted:
                texts[i] = text
        self._buffer = [(i, texts[i]) for i in st["buffer"]]
        self._exhausted = self._num_epochs is not None and self._epoch >= self._num_epochs

    def _next_in_order(self):
        """The next (text) of the shuffled global order, or None at the end of the last epoch."""
        while not self._exhausted:
            while not self._draining and len(self._buffer) < self._buffer_size:
                text = next(self._it, None)
                if text is None:
                    self._draining = True
                    break
                self._buffer.append((self._n_read, text))
                self._n_read += 1
            if not self._buffer:  # epoch finished
                self._epoch += 1
                self._n_read, self._draining = 0, False
                self._exhausted = self._num_epochs is not None and self._epoch >= self._num_epochs
                self._it = self._open_iter()
                continue
            j = int(self._rng.integers(len(self._buffer))) if self._buffer_size > 1 else 0
            item = self._buffer[j]
            if self._buffer_size > 1:
                self._buffer[j] = self._buffer[-1]
            self._buffer.pop(-1 if self._buffer_size > 1 else 0)
            self._pos += 1
            return item[1]
        return None

    refetchable = False

    def read(self, k: int) -> tuple[list[int], list]:
        """Positions and texts of up to ``k`` next documents (fewer only when the source is exhausted)."""
        positions, out = [], []
        while len(out) < k:
            target = order.peek(self.cursor)
            while self._pos < target:
                if self._next_in_order() is None:
                    return positions, out
            text = self._next_in_order()
            if text is None:
                break
            positions.append(order.take(self.cursor))
            out.append(text)
        return positions, out

    def state_dict(self) -> dict:
        return {
            "cursor": self.cursor,
            "shuffle": {
                "epoch": self._epoch,
                "n_read": self._n_read,
                "buffer": [i for i, _ in self._buffer],
                "rng": self._rng.bit_generator.state,
                "pos": self._pos,
                "draining": self._draining,
            },
        }
