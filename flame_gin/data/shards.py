"""A streaming source's files cut into blocks that any reading stream can open directly.

Hand-written because ``datasets`` streams a source file by file: ``IterableDataset.shard`` splits by whole files
(64 files cannot feed 128 streams) and a resumed iterator re-reads its file from the start. Pre-training needs
finer units, each one seek away: a parquet *row group*, or a byte range of a JSON-lines file (a block holds the
lines that *start* in its range, so blocks are found from the file size alone, without reading the file).

``resolve`` lists the files of a source's split through ``datasets``' own data-file resolution (local files,
glob patterns, folders and hub repositories name the files ``load_dataset`` would read; remote ones open
through ``fsspec``, e.g. ``hf://``), and their blocks: parquet footers give the row groups, JSON-lines sizes
the byte ranges. Other formats (plain text, csv, compressed JSON, loading scripts) return a reason instead, and
the caller replays the stream (``readers.StreamReader``).

The block index of hub files named at a commit is kept in the datasets cache (``index_cache``, ``cached``), so
a requeued job's ranks do not read thousands of parquet footers again (one process per machine lists them).

``Blocks.read(i)`` returns the raw rows of block ``i`` in storage order (None for a row without text) and
the bytes it read; ``Blocks.keep`` applies the source's hold-out and bad-row rules to one row.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import re

import numpy as np

from flame_gin.data import sources as sources_lib

_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4", ".zip")
_PINNED = re.compile(r"^hf://datasets/[^@]+@[0-9a-f]{40}/")  # a hub file at a commit: it never changes
_PARQUET, _JSONL = 0, 1

log = logging.getLogger(__name__)


def _open(path: str):
    if "://" not in path:
        return open(path, "rb")
    import fsspec

    return fsspec.open(path, "rb").open()


def _size(path: str) -> int:
    if "://" not in path:
        return os.path.getsize(path)
    import fsspec

    fs, inner = fsspec.core.url_to_fs(path)
    return int(fs.size(inner))


def _is_json_lines(path: str) -> bool:
    """A ``.jsonl`` file, or a ``.json`` file whose first non-blank byte opens an object (not an array)."""
    if path.endswith(".jsonl"):
        return True
    if not path.endswith(".json"):
        return False
    with _open(path) as f:
        head = f.read(4096).lstrip()
    return head[:1] == b"{"


def _parquet_blocks(path: str, field: str) -> list[tuple[int, int]]:
    """(row group, compressed bytes of the text column) for each row group of one parquet file."""
    import pyarrow.parquet as pq

    with _open(path) as f:
        meta = pq.ParquetFile(f).metadata
    names = [meta.schema.column(c).name for c in range(meta.num_columns)]
    if field not in names:
        raise KeyError(f"{path}: text field {field!r} not found; the columns are {sorted(names)}")
    col = names.index(field)
    return [(g, meta.row_group(g).column(col).total_compressed_size) for g in range(meta.num_row_groups)]


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Every block of one source split: block ``i`` is ``(file[i], a[i], b[i])``, a row group and its column
    bytes (parquet) or a byte range (JSON lines). Picklable, so DataLoader workers get it with the plan."""

    files: tuple
    kind: int
    field: str
    file: np.ndarray
    a: np.ndarray
    b: np.ndarray
    holdout: float = 0.0
    evaluation: bool = False
    bad_rows: str = "stop"

    def __len__(self) -> int:
        return len(self.file)

    @property
    def total_bytes(self) -> int:
        return int((self.b - self.a).sum()) if self.kind == _JSONL else int(self.b.sum())

    def where(self, i: int) -> str:
        path = self.files[self.file[i]]
        if self.kind == _PARQUET:
            return f"{path} row group {self.a[i]}"
        return f"{path} bytes {self.a[i]}-{self.b[i]}"

    def read(self, i: int) -> tuple[list, int]:
        """The rows of block ``i`` in storage order (None where a row has no text field) and the bytes read."""
        path = self.files[self.file[i]]
        if self.kind == _PARQUET:
            import pyarrow.parquet as pq

            with _open(path) as f:
                table = pq.ParquetFile(f).read_row_group(int(self.a[i]), columns=[self.field])
            return table.column(0).to_pylist(), int(self.b[i])
        return self._read_lines(path, int(self.a[i]), int(self.b[i]))

    def _read_lines(self, path: str, start: int, end: int) -> tuple[list, int]:
        out = []
        with _open(path) as f:
            f.seek(max(0, start - 1))
            if start > 0:
                f.readline()  # the rest of a line that began before ``start`` (just its newline if it ended there)
            pos = read_from = f.tell()
            while pos < end:
                line = f.readline()
                if not line:
                    break
                pos += len(line)
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        raise ValueError(f"{path}: the line at byte {pos - len(line)} is not valid JSON ({e})") from e
                    out.append(row.get(self.field) if isinstance(row, dict) else None)
        return out, pos - read_from

    def keep(self, text, *, block: int, row: int) -> bool:
        """Whether a row is read as a document: it has text (else stop or skip, ``bad_rows``) and lies on this
        split's side of the hold-out."""
        if not isinstance(text, str):
            if self.bad_rows == "stop":
                raise ValueError(
                    f"{self.where(block)}, row {row}: no text in field {self.field!r} ({text!r}); set "
                    "flame_gin.build_loader.bad_rows = 'skip' to train without it"
                )
            log.warning("%s, row %d: skipped, no text in field %r", self.where(block), row, self.field)
            return False
        return not self.holdout or sources_lib.held_out(text, share=self.holdout) == self.evaluation


def index_cache(files: list[str], *, field: str, kind: int, block_bytes: int, cache_dir: str | None):
    """Where the block index of ``files`` is kept between runs, or None when it must be listed afresh. Only hub
    files named at a commit qualify (``datasets`` resolves hub patterns to such URLs): listing a corpus of
    thousands of parquet files reads thousands of footers, which every rank of a requeued job would repeat."""
    if not files or not all(_PINNED.match(f) for f in files):
        return None
    if cache_dir is None:
        import datasets

        cache_dir = datasets.config.HF_DATASETS_CACHE
    key = hashlib.sha256(json.dumps([files, field, kind, block_bytes]).encode()).hexdigest()[:32]
    return pathlib.Path(cache_dir) / "flame_gin_block_index" / f"{key}.npy"


def cached(path: pathlib.Path | None, compute) -> np.ndarray:
    """``compute()`` (an int64 array), kept at ``path``: one process per machine computes it under a file lock,
    the others wait and read it; a later run reads it at once. ``path`` None: computed every time."""
    if path is None:
        return compute()
    if path.exists():
        return np.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(compute(), dtype=np.int64))
            os.replace(tmp, path)
    return np.load(path)


def _spans(files: list[str], *, kind: int, field: str, block_bytes: int) -> np.ndarray:
    """(file, a, b) of every block, as an int64 array of shape (blocks, 3)."""
    if kind == _PARQUET:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:  # footers of remote files: one request each
            per_file = list(pool.map(lambda f: _parquet_blocks(f, field), files))
        spans = [(k, a, b) for k, groups in enumerate(per_file) for a, b in groups]
    else:
        spans = [
            (k, a, min(a + block_bytes, size))
            for k, size in enumerate(map(_size, files))
            for a in range(0, size, block_bytes)
        ]
    return np.asarray(spans, dtype=np.int64).reshape(-1, 3)


def resolve(
    src: sources_lib.Source, *, split: str, block_bytes: int, bad_rows: str, cache_dir: str | None = None
) -> tuple[Blocks | None, str]:
    """The blocks of ``split`` of ``src``, or None and why it cannot be read by blocks. ``bad_rows`` ('stop' or
    'skip') is checked by ``plan.make_plan`` before any source is opened."""
    import datasets

    kwargs = sources_lib.load_arguments(src, sources_lib.split_name(src, split))
    name = kwargs.pop("split")
    kwargs.pop("streaming")
    try:
        builder = datasets.load_dataset_builder(**kwargs, cache_dir=cache_dir)
    except Exception as e:  # a loading script, an unreachable hub: the stream is replayed instead
        return None, f"its files could not be listed ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})"
    files = {str(k): v for k, v in (builder.config.data_files or {}).items()}.get(name)
    if not files:
        return None, f"the {builder.name!r} builder lists no files for split {name!r}"
    files = [str(f) for f in files]
    if any(f.endswith(_COMPRESSED) for f in files):
        return None, "its files are compressed as a whole"
    if block_bytes < 1:
        raise ValueError(f"block_bytes={block_bytes} (flame_gin.build_loader.block_bytes) must be positive")
    if builder.name == "parquet":
        kind = _PARQUET
    elif builder.name == "json" and all(_is_json_lines(f) for f in files):
        kind = _JSONL
    else:
        return None, f"{builder.name} files are read whole (blocks need parquet or JSON lines)"
    where = index_cache(files, field=src.text_field, kind=kind, block_bytes=block_bytes, cache_dir=cache_dir)
    spans = cached(where, lambda: _spans(files, kind=kind, field=src.text_field, block_bytes=block_bytes))
    if not len(spans):
        return None, "its files hold no data"
    file, a, b = spans[:, 0].copy(), spans[:, 1].copy(), spans[:, 2].copy()
    blocks = Blocks(
        files=tuple(files),
        kind=kind,
        field=src.text_field,
        file=file,
        a=a,
        b=b,
        holdout=src.holdout,
        evaluation=split == "validation",
        bad_rows=bad_rows,
    )
    return blocks, ""
