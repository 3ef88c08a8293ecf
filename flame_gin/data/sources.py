"""Describing a text source and opening one split of it through Hugging Face ``datasets``.

A ``Source`` names what ``datasets.load_dataset`` needs (a hub name, a builder such as ``json``/``parquet``/
``text``/``arrow`` with ``data_files``/``data_dir``, or a local file or folder), the split to read for
training and for evaluation, the text column, and whether to stream. Opening checks everything that can be
checked before a model is built (missing files, empty splits, a missing text column) and raises an error that
names the value at fault.

Evaluation never reads training documents. A source without a validation split of its own (FineWeb-Edu has
only ``train``) sets ``holdout``: a fixed share of its training documents, chosen by a hash of each
document's text (so the same documents whatever the seed, the number of ranks or workers, and the order), is
skipped by training and is what evaluation reads. A source whose evaluation split would be its training split
without a hold-out is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import os
import pathlib

from flame_gin.data import rows

_BUILDER_BY_SUFFIX = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".arrow": "arrow",
    ".csv": "csv",
}


@dataclasses.dataclass(frozen=True)
class Source:
    """One text source; ``path`` is a hub name, a ``datasets`` builder name, or a local file or folder."""

    path: str
    name: str | None = None
    data_dir: str | None = None
    data_files: str | list | dict | None = None
    train_split: str = "train"
    validation_split: str = "validation"
    text_field: str = "text"
    streaming: bool = False
    label: str | None = None
    holdout: float = 0.0

    @property
    def display_name(self) -> str:
        return self.label or (self.name and f"{self.path}/{self.name}") or pathlib.Path(str(self.path)).name


def source(
    *,
    path: str,
    name: str | None = None,
    data_dir: str | None = None,
    data_files=None,
    train_split: str = "train",
    validation_split: str = "validation",
    text_field: str = "text",
    streaming: bool = False,
    label: str | None = None,
    holdout: float = 0.0,
) -> Source:
    """Builds a ``Source`` (the gin-facing constructor; lists in ``data_files`` become tuples).

    ``holdout`` (0 to 1, exclusive): the share of the training split's documents held out for evaluation.
    Raises when evaluation would read the training documents (the same split, or the same files for both)."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"data source {path!r}: holdout={holdout} must lie in [0, 1)")
    same_files = (
        isinstance(data_files, dict)
        and train_split in data_files
        and validation_split in data_files
        and data_files[train_split] == data_files[validation_split]
    )
    if not holdout and (train_split == validation_split or same_files):
        raise ValueError(
            f"data source {path!r}: evaluation would read the training documents (validation_split="
            f"{validation_split!r}{', the same data_files' if same_files else ''}); give it a split or files of "
            f"its own, or set 'holdout' (for example 0.001) to hold out a share of the training documents"
        )
    if isinstance(data_files, list):
        data_files = tuple(data_files)
    if isinstance(data_files, dict):
        data_files = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data_files.items()}
    return Source(
        path=path,
        name=name,
        data_dir=data_dir,
        data_files=data_files,
        train_split=train_split,
        validation_split=validation_split,
        text_field=text_field,
        streaming=streaming,
        label=label,
        holdout=float(holdout),
    )


def held_out(text: str, *, share: float) -> bool:
    """Whether a document belongs to the held-out share: its text's 64-bit BLAKE2b hash, as a fraction of
    2**64, is below ``share``. A function of the text alone, so training and evaluation agree on every
    rank and worker without coordination."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < share * 2.0**64


def _keep(batch: dict, *, field: str, share: float, evaluation: bool) -> list[bool]:
    return [text is not None and held_out(text, share=share) == evaluation for text in batch[field]]


def _check_local_files(files, *, what: str) -> None:
    if isinstance(files, dict):
        for v in files.values():
            _check_local_files(v, what=what)
        return
    for f in [files] if isinstance(files, (str, os.PathLike)) else list(files):
        f = str(f)
        if "://" in f:
            continue
        if glob.has_magic(f):
            if not glob.glob(f, recursive=True):
                raise FileNotFoundError(f"{what}: no file matches {f!r}")
        elif not os.path.exists(f):
            raise FileNotFoundError(f"{what}: file {f!r} does not exist")


def load_arguments(src: Source, split: str) -> dict:
    """Translates a ``Source`` into ``load_dataset`` keyword arguments, checking local paths first."""
    path, data_files, data_dir = str(src.path), src.data_files, src.data_dir
    looks_local = path.startswith((".", "/", "~")) or os.path.splitext(path)[1] in _BUILDER_BY_SUFFIX
    if looks_local:
        local = os.path.expanduser(path)
        if not os.path.exists(local):
            raise FileNotFoundError(f"data source path {path!r} does not exist")
        if os.path.isfile(local):
            builder = _BUILDER_BY_SUFFIX.get(os.path.splitext(local)[1])
            if builder is None:
                raise ValueError(
                    f"data source {path!r}: cannot tell the format from its suffix "
                    f"(known: {sorted(_BUILDER_BY_SUFFIX)})"
                )
            path, data_files = builder, {src.train_split: local}
        else:
            path = local
    if data_files is not None:
        _check_local_files(data_files, what=f"data source {src.path!r}")
        if isinstance(data_files, tuple):
            data_files = list(data_files)
        if isinstance(data_files, dict):
            data_files = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_files.items()}
    if (
        data_dir is not None
        and "://" not in str(data_dir)
        and not os.path.isdir(os.path.join(path, data_dir))
        and not os.path.isdir(data_dir)
    ):
        raise FileNotFoundError(f"data source {src.path!r}: data_dir {data_dir!r} does not exist")
    kwargs = {"path": path, "split": split, "streaming": src.streaming}
    if src.name is not None:
        kwargs["name"] = src.name
    if data_files is not None:
        kwargs["data_files"] = data_files
    if data_dir is not None:
        kwargs["data_dir"] = data_dir
    return kwargs


def _local_files(data_files) -> list[str]:
    if isinstance(data_files, dict):
        return [f for v in data_files.values() for f in _local_files(v)]
    files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files or [])
    out = []
    for f in map(str, files):
        if "://" not in f:
            out += sorted(glob.glob(f, recursive=True)) if glob.has_magic(f) else [f]
    return out


def _first_bad_json_line(kwargs: dict) -> str | None:
    """The file and line ``datasets`` choked on, for local json/jsonl data: its own error names neither."""
    import json

    for name in _local_files(kwargs.get("data_files")):
        if not os.path.isfile(name):
            continue
        if os.path.getsize(name) == 0:
            return f"{name} is empty"
        if not name.endswith(".jsonl"):
            continue
        with open(name, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        json.loads(line.strip())
                    except ValueError as err:
                        return f"{name} line {number} is not valid JSON ({err})"
    return None


def split_name(src: Source, split: str) -> str:
    """The dataset split that loader split ``train``/``validation`` reads for ``src``."""
    if split == "train":
        return src.train_split
    if split == "validation":
        return src.train_split if src.holdout else src.validation_split
    raise ValueError(f"split must be 'train' or 'validation', got {split!r}")


def open_split(src: Source, *, split: str, cache_dir: str | None = None, bad_rows: str = "stop"):
    """Opens ``split`` of ``src``: a ``datasets.Dataset`` (or ``IterableDataset`` when streaming) of one column.

    Raises early, naming the value, for a missing path, an unknown split, an empty split or a missing column;
    rows without text are reported or skipped (``bad_rows``, see ``rows``).
    """
    import datasets

    kwargs = load_arguments(src, split_name(src, split))
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    try:
        ds = datasets.load_dataset(**kwargs)
    except Exception as e:  # keep the familiar type where it can carry our message, else RuntimeError
        where = _first_bad_json_line(kwargs) if kwargs["path"] == "json" else None
        message = f"cannot open data source {src.path!r} (split {kwargs['split']!r}): {where or e}"
        kind = (
            ValueError
            if where
            else next(
                (t for t in (FileNotFoundError, ConnectionError, ValueError, OSError) if isinstance(e, t)), RuntimeError
            )
        )
        raise kind(message) from e
    columns = ds.column_names
    if columns is None and src.streaming:
        first = next(iter(ds.take(1)), None)
        if first is None:
            raise ValueError(f"data source {src.path!r} split {kwargs['split']!r} is empty")
        columns = list(first)
    if src.text_field not in columns:
        raise KeyError(
            f"data source {src.path!r}: text field {src.text_field!r} not found; the columns are {sorted(columns)}"
        )
    ds = ds.select_columns([src.text_field])
    ds = rows.handle(
        ds,
        field=src.text_field,
        what=f"data source {src.path!r} split {kwargs['split']!r}",
        files=_local_files(kwargs.get("data_files")),
        bad_rows=bad_rows,
        streaming=src.streaming,
    )
    if src.streaming:
        if next(iter(ds.take(1)), None) is None:
            raise ValueError(f"data source {src.path!r} split {kwargs['split']!r} is empty")
    elif len(ds) == 0:
        raise ValueError(f"data source {src.path!r} split {kwargs['split']!r} is empty")
    if src.holdout:
        ds = ds.filter(
            functools.partial(_keep, field=src.text_field, share=src.holdout, evaluation=split == "validation"),
            batched=True,
        )
        if not src.streaming and len(ds) == 0:
            raise ValueError(
                f"data source {src.path!r}: holdout={src.holdout} leaves no {split} document "
                f"in split {kwargs['split']!r}"
            )
    return ds
