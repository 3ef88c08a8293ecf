"""Offline mode: tokenize a source once into a memory-mapped token store and read documents from it.

Repeated runs over the same data then skip tokenization entirely. The store is two files, a flat token array
(``uint16`` when the vocabulary fits, else ``uint32``) and document offsets, under a directory keyed by a hash
of the source description and the tokenizer's files, written to a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile

import numpy as np

_CHUNK = 1024


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


class TokenStore:
    """Read-only view of a built store; ``fetch(indices)`` returns one token array per document."""

    def __init__(self, directory: pathlib.Path):
        self.directory = directory
        self._offsets = np.load(directory / "offsets.npy", mmap_mode="r")
        meta = json.loads((directory / "meta.json").read_text())
        self._tokens = np.memmap(directory / "tokens.bin", dtype=meta["dtype"], mode="r")

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def fetch(self, indices: list[int]) -> list[np.ndarray]:
        o = self._offsets
        return [np.asarray(self._tokens[o[i] : o[i + 1]], dtype=np.int32) for i in indices]

    def __reduce__(self):  # workers reopen the memory map instead of copying it
        return (TokenStore, (self.directory,))


def build_store(*, texts, tokenize, vocab_size: int, directory: pathlib.Path) -> TokenStore:
    """Tokenizes the iterable ``texts`` into ``directory`` unless it already holds a finished store."""
    if (directory / "meta.json").exists():
        return TokenStore(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=directory.parent, prefix=".store-"))
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    offsets, total, chunk = [0], 0, []
    with open(tmp / "tokens.bin", "wb") as out:

        def flush():
            nonlocal total
            for ids in tokenize(chunk):
                out.write(ids.astype(dtype).tobytes())
                total += len(ids)
                offsets.append(total)
            chunk.clear()

        for text in texts:
            chunk.append(text)
            if len(chunk) >= _CHUNK:
                flush()
        if chunk:
            flush()
    if len(offsets) == 1:
        raise ValueError(f"cannot build a token store in {directory}: the source has no documents")
    np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    (tmp / "meta.json").write_text(json.dumps({"dtype": np.dtype(dtype).name, "documents": len(offsets) - 1}))
    try:
        os.rename(tmp, directory)
    except OSError:
        if not (directory / "meta.json").exists():
            raise
    return TokenStore(directory)
