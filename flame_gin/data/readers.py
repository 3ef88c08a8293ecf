"""Reading documents of one source in the source's global order, for one stream, with resumable state.

``MapReader`` serves a random-access (map-style) source: the global order of epoch ``e`` is an exact seeded
permutation (or the stored order when shuffling is off), and the stream's cursor picks its positions.

``BlockReader`` serves a streaming source whose files can be cut into blocks (``shards``): the global order of
epoch ``e`` is a seeded permutation of the blocks, each block's rows in a seeded order of their own; a stream's
cursor owns whole blocks, so N streams read disjoint blocks and together read the corpus once per epoch. The
state names the blocks in progress and how many rows of each are done, so a restored stream reads those blocks
again and nothing before them (no replay).

``StreamReader`` serves any other streaming source: every stream replays the same seeded buffer shuffle of the
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
        self._fetch = fetch
        self._limit = None if num_epochs is None else num_epochs * size
        self.cursor = cursor
        self._order = order.EpochOrder(n=size, seed=seed, source=source, shuffle=shuffle)

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
        return self._fetch([self._order(p)[1] for p in positions]) if positions else []

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}


class BlockReader:
    """Documents of a block-addressable source (``shards.Blocks``): whole blocks per stream, no replay."""

    refetchable = False

    def __init__(
        self, *, blocks, seed: int, source: int, shuffle: bool, num_epochs: int | None, cursor: dict, partial: list
    ):
        self._blocks, self._seed, self._source, self._shuffle = blocks, seed, source, shuffle
        self._limit = None if num_epochs is None else num_epochs * len(blocks)
        self.cursor = cursor
        self.partial = partial  # [[position, rows done], ...]: blocks taken and not finished, finished in order
        self._order = order.EpochOrder(n=len(blocks), seed=seed, source=source, shuffle=shuffle)
        self._rows_at = (None, None, [])  # (position, block, rows in this epoch's order) of partial[0]
        self.bytes_read = 0  # not state: what this object fetched (for measurements)

    def _rows(self, p: int) -> tuple[int, list]:
        if self._rows_at[0] != p:
            epoch, i = self._order(p)
            rows, nbytes = self._blocks.read(i)
            self.bytes_read += nbytes
            index = list(range(len(rows)))
            if self._shuffle:
                rng = np.random.Generator(np.random.PCG64([self._seed, self._source, epoch, i, 0xB10C]))
                index = rng.permutation(len(rows)).tolist()
            self._rows_at = (p, i, [(j, rows[j]) for j in index])
        return self._rows_at[1], self._rows_at[2]

    def read(self, k: int) -> tuple[list[int], list]:
        """Positions (of blocks) and texts of up to ``k`` next documents (fewer only when the source is exhausted)."""
        positions, out = [], []
        while len(out) < k:
            if not self.partial:
                if self._limit is not None and order.peek(self.cursor) >= self._limit:
                    break
                self.partial.append([order.take(self.cursor), 0])
            p, done = self.partial[0]
            block, rows = self._rows(p)
            if done >= len(rows):
                self.partial.pop(0)
                continue
            self.partial[0][1] = done + 1
            row, text = rows[done]
            if self._blocks.keep(text, block=block, row=row):
                positions.append(p)
                out.append(text)
        return positions, out

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "partial": [list(x) for x in self.partial]}


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
