"""The token store: a source tokenized once, read memory-mapped, with exact positions for any number of readers.

Repeated runs over the same data then skip tokenization, every data-parallel rank and worker opens the same
files and reads only the documents it owns, and a resume seeks to a document index instead of re-reading.

On disk a store is a folder of three files, readable with numpy alone:

- ``tokens.bin``: every document's token ids, one after another, as raw little-endian ``uint16`` (when the
  vocabulary fits) or ``uint32``: ``np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r")``;
- ``offsets.npy``: ``int64`` document boundaries, ``documents + 1`` values rising from 0 to the token count:
  document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]`` (``np.load(folder / "offsets.npy", mmap_mode="r")``);
- ``meta.json``: ``{"dtype": ..., "documents": ..., "tokens": ...}`` and where the store came from.

A folder without ``meta.json`` is not a store: builders write elsewhere and rename the finished folder into
place (``flame_gin.data.store_build``). Offline mode keeps one store per (source, split, tokenizer) under the
cache directory, named by ``store_key``; a prepared or ingested corpus is a folder holding one store per split
(``<folder>/train``, ``<folder>/validation``), named as a source's ``path``.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np

TOKENS_FILE, OFFSETS_FILE, META_FILE = "tokens.bin", "offsets.npy", "meta.json"


def _tokenizer_digest(tokenizer_path: str) -> str:
    h = hashlib.sha256(tokenizer_path.encode())
    root = pathlib.Path(tokenizer_path)
    if root.is_dir():
        for f in sorted(root.iterdir()):
            if f.is_file():
                h.update(f.name.encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def store_key(*, description: dict, tokenizer_path: str) -> str:
    """A stable name for the store of ``description`` (a JSON-able source spec) under one tokenizer."""
    blob = json.dumps(description, sort_keys=True, default=str) + _tokenizer_digest(tokenizer_path)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def is_store(directory: pathlib.Path | str) -> bool:
    """Whether ``directory`` holds a finished store."""
    return (pathlib.Path(directory) / META_FILE).is_file()


def write_meta(directory: pathlib.Path, **meta) -> None:
    """Writes ``meta.json`` last: its presence is what makes the folder a store."""
    (directory / META_FILE).write_text(json.dumps(meta, sort_keys=True))


class TokenStore:
    """Read-only view of a built store; ``fetch(indices)`` returns one token array per document."""

    def __init__(self, directory: pathlib.Path | str):
        self.directory = pathlib.Path(directory)
        self._offsets = np.load(self.directory / OFFSETS_FILE, mmap_mode="r")
        self.meta = json.loads((self.directory / META_FILE).read_text())
        self._tokens = np.memmap(self.directory / TOKENS_FILE, dtype=self.meta["dtype"], mode="r")

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def fetch(self, indices: list[int]) -> list[np.ndarray]:
        o = self._offsets
        return [np.asarray(self._tokens[o[i] : o[i + 1]], dtype=np.int32) for i in indices]

    def describe(self) -> dict:
        """Folder, documents and tokens, for logs and the prepare command's report."""
        return {"directory": str(self.directory), "documents": len(self), "tokens": int(self._offsets[-1])}

    def __reduce__(self):  # workers reopen the memory map instead of copying it
        return (TokenStore, (self.directory,))
