"""Rows without text (null, or not a string): found before training, reported by file and line, or skipped.

A corpus of millions of documents holds a few broken rows; a user wants to hear which ones (to fix the
data) or to train past them on purpose, never a ``TypeError`` from the tokenizer after the model is built.
``bad_rows='stop'`` (the default) raises a ``ValueError`` naming the source, the row and, for a local jsonl
file, the file and line; ``'skip'`` drops them and logs how many. A map-style split is checked in one
vectorised pass over its Arrow column before anything is built; a streaming split cannot be read ahead, so
its rows are checked as they stream (skipped ones are logged one by one).
"""

from __future__ import annotations

import logging

MODES = ("stop", "skip")
_SHOWN = 5

log = logging.getLogger(__name__)


def check_mode(bad_rows: str) -> None:
    if bad_rows not in MODES:
        raise ValueError(f"bad_rows={bad_rows!r} (flame_gin.build_loader.bad_rows): use one of {list(MODES)}")


def handle(ds, *, field: str, what: str, files: list[str], bad_rows: str, streaming: bool):
    """``ds`` (one text column) without its bad rows, or a ``ValueError`` naming them (``bad_rows='stop'``)."""
    check_mode(bad_rows)
    if streaming:
        return ds.filter(_StreamCheck(field=field, what=what, bad_rows=bad_rows), with_indices=True)
    bad = _bad_indices(ds, field=field)
    if not bad:
        return ds
    if bad_rows == "stop":
        shown = ", ".join(_where(i, files=files) for i in bad[:_SHOWN])
        more = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
        raise ValueError(
            f"{what}: {len(bad)} row(s) without text in field {field!r}: {shown}{more}; fix the data, "
            f"or set flame_gin.build_loader.bad_rows = 'skip' to train without them"
        )
    log.warning(
        "%s: skipping %d row(s) without text in field %r (first: %s)",
        what,
        len(bad),
        field,
        _where(bad[0], files=files),
    )
    drop = set(bad)
    return ds.select([i for i in range(len(ds)) if i not in drop])


def _bad_indices(ds, *, field: str) -> list[int]:
    import pyarrow as pa
    import pyarrow.compute as pc

    column = ds.data.column(field)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        mask = pc.is_null(column)
    else:  # numbers, lists, ...: no row of it is text
        mask = pa.chunked_array([pa.array([True] * len(column))]) if len(column) else pc.is_null(column)
    return pc.indices_nonzero(
        pa.concat_arrays(mask.chunks) if mask.num_chunks else pa.array([], pa.bool_())
    ).to_pylist()


def _where(index: int, *, files: list[str]) -> str:
    """'row N' and, for one local jsonl file, its file and line (json Lines skips blank lines)."""
    if len(files) == 1 and files[0].endswith(".jsonl"):
        with open(files[0], encoding="utf-8", errors="replace") as f:
            seen = -1
            for number, line in enumerate(f, 1):
                seen += bool(line.strip())
                if seen == index:
                    return f"{files[0]} line {number}"
    return f"row {index}" + (f" of {files}" if files else "")


class _StreamCheck:
    """A picklable filter for streaming splits (DataLoader workers copy it)."""

    def __init__(self, *, field: str, what: str, bad_rows: str):
        self.field, self.what, self.bad_rows = field, what, bad_rows

    def __call__(self, row: dict, index: int) -> bool:
        if isinstance(row[self.field], str):
            return True
        if self.bad_rows == "stop":
            raise ValueError(
                f"{self.what}: row {index} of the stream has no text in field {self.field!r} "
                f"({row[self.field]!r}); set flame_gin.build_loader.bad_rows = 'skip' to train without it"
            )
        log.warning("%s: skipping row %d of the stream: no text in field %r", self.what, index, self.field)
        return False
