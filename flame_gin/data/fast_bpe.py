"""A byte-level BPE tokenizer's exact ids at tiktoken's speed.

Online tokenization bounds the data pipeline: the HF tokenizer's Rust backend spends most of its time on
per-token bookkeeping (alignments, token strings) that training never reads. ``tiktoken`` runs the same
regex split (GPT-2's, or the ``Split`` pattern of Llama-3-style tokenizers) and byte-pair merging several
times faster, but it merges by *token rank* (any adjacent
pair whose concatenation is a token) where HF's BPE merges only *listed pairs*, in list order. The two agree
on every input when the rank table is built as follows, and ``compile_fast`` builds it that way or declines:

* ranks follow the merge list (the 256 bytes first, then merge ``i`` at ``256 + i``), and each merged token is
  the result of exactly one listed merge, so a listed pair has the same priority under both rules;
* a merged token enters the table only if HF's own BPE model encodes its bytes to that single token. Proof
  sketch: the merges that build a symbol in any context are replayed in the same order on the symbol's bytes
  alone, so a token HF can ever emit encodes to itself; and if tiktoken could join adjacent ``x, y`` into a
  token ``t`` that is not their listed merge, HF on ``t``'s bytes alone would stop at ``[x, y]``, which the
  self-encoding check rules out. Tokens that fail the check are never produced by HF, so dropping them
  changes nothing. With ``ignore_merges`` (HF emits a piece that is a token as it is, as tiktoken does) the
  check runs on a merge-only copy of the model and no token may fail it.

Added tokens (``<s>``, ``</s>``, ...) are cut out of the text first and mapped to their ids, as HF does.
What remains assumed is that tiktoken's regex engine splits the pattern as HF's does (both follow
Unicode's letter/number/space classes; versions of the Unicode tables could differ on newly assigned
characters), so ``FastBPE`` re-encodes a fixed share of documents with HF and raises on any difference.
"""

from __future__ import annotations

import array
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# HF's ByteLevel pre-tokenizer pattern (use_regex=True).
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


_PIECE_CHARS = 1 << 15  # threads take documents longer than twice this in pieces of about this size


def _printable_around(text: str, j: int) -> bool:
    return "!" <= text[j - 1] <= "~" and "!" <= text[j + 1] <= "~"


class TokenizerMismatch(RuntimeError):
    """The fast path and the HF tokenizer disagreed on a document (see ``FastBPE``)."""


def _split_pattern(pre: dict) -> str | None:
    """The regex that splits text into pieces: ByteLevel's own (GPT-2), or a Split(Isolated) in front of a
    ByteLevel without regex (Llama-3 style); None for any other pre-tokenizer."""
    if pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space") and pre.get("use_regex", True):
        return GPT2_SPLIT
    steps = pre.get("pretokenizers") or []
    if pre.get("type") != "Sequence" or len(steps) != 2:
        return None
    split, byte_level = steps
    if (
        split.get("type") != "Split"
        or split.get("behavior") != "Isolated"
        or split.get("invert")
        or "Regex" not in (split.get("pattern") or {})
    ):
        return None
    if byte_level.get("type") != "ByteLevel" or byte_level.get("add_prefix_space") or byte_level.get("use_regex"):
        return None
    return split["pattern"]["Regex"]


def _ineligible(spec: dict) -> str | None:
    """Why the tokenizer's JSON spec is outside what the proof covers, or None."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        return f"model type {model.get('type')!r} is not BPE"
    if spec.get("normalizer") is not None:
        return "it has a normalizer"
    if _split_pattern(pre) is None:
        return (
            "its pre-tokenizer is neither ByteLevel(add_prefix_space=False, use_regex=True) nor "
            "Split(regex, Isolated) + ByteLevel(use_regex=False)"
        )
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            return f"its BPE model sets {key}={model[key]!r}"
    if model.get("byte_fallback"):
        return "its BPE model uses byte_fallback"
    for tok in spec.get("added_tokens") or []:
        if tok.get("lstrip") or tok.get("rstrip") or tok.get("single_word"):
            return f"added token {tok['content']!r} strips spaces or matches single words"
    return None


def compile_fast(tokenizer, *, audit_every: int = 256):
    """A ``FastBPE`` equal to ``tokenizer`` (a ``PreTrainedTokenizerFast``), or ``(None, reason)``.

    Returns ``(FastBPE, None)`` when the tokenizer is a byte-level BPE the proof in the module docstring
    covers and ``tiktoken`` is installed; the reason otherwise (callers keep the HF path and log it).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None, "it has no Rust backend"
    try:
        import tiktoken
    except ImportError:
        return None, "tiktoken is not installed"
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spec = json.loads(backend.to_str())
    reason = _ineligible(spec)
    if reason:
        return None, reason
    model = spec["model"]
    vocab = model["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    if any(ch not in vocab for ch in byte_of):
        return None, "its vocabulary lacks some of the 256 byte symbols"
    results = [a + b for a, b in merges]
    if len(set(results)) != len(results) or any(r not in vocab for r in results):
        return None, "a merged token is missing from the vocabulary or made by two merges"
    ranks = {bytes([b]): b for b in range(256)}
    id_of_rank = np.full(256 + len(merges), -1, dtype=np.int32)
    for ch, b in byte_of.items():
        id_of_rank[b] = vocab[ch]
    bpe = backend.model
    if model.get("ignore_merges"):
        from tokenizers import models

        bpe = models.BPE(vocab=vocab, merges=merges)  # merges only, for the self-encoding check
    dropped = 0
    for i, tok in enumerate(results):
        if [t.id for t in bpe.tokenize(tok)] != [vocab[tok]]:
            dropped += 1  # never emitted by HF: see the module docstring
            continue
        ranks[bytes(byte_of[c] for c in tok)] = 256 + i
        id_of_rank[256 + i] = vocab[tok]
    if dropped and model.get("ignore_merges"):
        return None, f"ignore_merges with {dropped} tokens that merging alone never builds"
    pattern = _split_pattern(spec["pre_tokenizer"])
    encoding = tiktoken.Encoding(
        name="flame_gin_fast_bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens={}, explicit_n_vocab=None
    )
    added = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
    fast = FastBPE(
        encoding=encoding,
        id_of_rank=id_of_rank,
        added=added,
        reference=backend,
        audit_every=audit_every,
        cut_newlines=pattern == GPT2_SPLIT,
    )
    logging.info(
        "fast BPE path on: %d merged tokens, %d never emitted by the HF model left out, %d added tokens",
        len(merges) - dropped,
        dropped,
        len(added),
    )
    return fast, None


class FastBPE:
    """Texts to int32 id arrays; every ``audit_every``-th document is also encoded by HF and compared."""

    def __init__(
        self, *, encoding, id_of_rank: np.ndarray, added: dict, reference, audit_every: int, cut_newlines: bool
    ):
        self._enc, self._id_of_rank, self._added, self._ref = encoding, id_of_rank, added, reference
        self._split = (
            re.compile("(" + "|".join(map(re.escape, sorted(added, key=len, reverse=True))) + ")") if added else None
        )
        self._audit_every, self._seen = audit_every, 0
        self._pool, self._pool_pid = None, None
        # the newline cut of _pieces is proven for the GPT-2 pattern only
        self._cut_newlines = cut_newlines and not any("\n" in a for a in added)

    def _ranks_to_ids(self, text: str) -> np.ndarray:
        # encode_ordinary skips the special-token scan of encode/encode_to_numpy (measured 20-30% faster here);
        # array.array converts its list about 3x faster than numpy does
        ranks = np.frombuffer(array.array("I", self._enc.encode_ordinary(text)), dtype=np.uint32)
        return self._id_of_rank[ranks]

    def _mentions_added(self, text: str) -> bool:
        if self._split is None:
            return False
        if len(self._added) <= 8:  # a few substring scans beat the regex
            return any(a in text for a in self._added)
        return self._split.search(text) is not None

    def _one(self, text: str) -> np.ndarray:
        try:  # tiktoken would quietly replace a lone surrogate; HF cannot encode the text at all
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"a document holds invalid Unicode (a lone surrogate at character {e.start}, near "
                f"{text[max(0, e.start - 40) : e.start + 40]!r}), which the HF tokenizer cannot "
                "encode either: clean the source"
            ) from None
        if not self._mentions_added(text):
            return self._ranks_to_ids(text)
        parts = []
        for k, piece in enumerate(self._split.split(text)):
            if k % 2:
                parts.append(np.asarray([self._added[piece]], dtype=np.int32))
            elif piece:
                parts.append(self._ranks_to_ids(piece))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    def threads(self) -> int:
        """Encoding threads: RAYON_NUM_THREADS / TOKENIZERS_PARALLELISM as for HF tokenizers, else all cores."""
        if os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in ("0", "false", "no", "off"):
            return 1
        n = os.environ.get("RAYON_NUM_THREADS")
        return max(1, int(n)) if n else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        if self.threads() == 1:
            out = [self._one(t) for t in texts]
            self._audit(texts, out)
            return out
        return self.submit(texts).result()

    def submit(self, texts: list[str]) -> "_Pending":
        """Starts encoding ``texts`` on the thread pool; ``.result()`` waits and returns what ``self(texts)``
        would. Long documents are cut where the split provably restarts (``_pieces``) and the pieces queued
        longest first, so one large file does not leave the other threads idle; tiktoken releases the GIL
        while it encodes."""
        if self._pool_pid != os.getpid():  # a forked DataLoader worker inherits no pool threads
            self._pool, self._pool_pid = ThreadPoolExecutor(max_workers=self.threads()), os.getpid()
        jobs = [(i, k, piece) for i, t in enumerate(texts) for k, piece in enumerate(self._pieces(t))]
        jobs.sort(key=lambda job: -len(job[2]))
        futures = [(i, k, self._pool.submit(self._one, piece)) for i, k, piece in jobs]
        return _Pending(owner=self, texts=texts, futures=futures)

    def _pieces(self, text: str) -> list[str]:
        """``text`` cut after newlines that have a printable ASCII character on each side, about every
        ``_PIECE_CHARS`` characters. Such a newline is a split piece of its own under the pattern (no
        whitespace run reaches it, the lookahead sees a non-space either way), so the ids of the pieces,
        concatenated, are the ids of the text. Only for the GPT-2 pattern and when no added token contains a
        newline."""
        if len(text) <= 2 * _PIECE_CHARS or not self._cut_newlines:
            return [text]
        cuts, pos = [0], _PIECE_CHARS
        while pos < len(text) - 1:
            j = text.find("\n", pos)
            while j != -1 and j < len(text) - 1 and not _printable_around(text, j):
                j = text.find("\n", j + 1)
            if j == -1 or j >= len(text) - 1:
                break
            cuts.append(j + 1)
            pos = j + 1 + _PIECE_CHARS
        cuts.append(len(text))
        return [text[a:b] for a, b in zip(cuts, cuts[1:])]

    def _audit(self, texts: list[str], out: list[np.ndarray]) -> None:
        if self._audit_every <= 0:
            return
        for text, ids in zip(texts, out):
            self._seen += 1
            if self._seen % self._audit_every:
                continue
            want = self._ref.encode(text, add_special_tokens=False).ids
            if list(ids) != want:
                k = next((i for i, (a, b) in enumerate(zip(ids, want)) if a != b), min(len(ids), len(want)))
                raise TokenizerMismatch(
                    f"the fast BPE path and the HF tokenizer disagree at token {k} of a document starting "
                    f"{text[:80]!r} (fast {list(ids[k : k + 5])}, HF {want[k : k + 5]}); set "
                    "flame_gin.build_loader.fast_tokenizer=False (gin) to tokenize with HF only"
                )

    def __getstate__(self):
        raise TypeError("FastBPE is built per process (compile_fast); do not pickle it")


class _Pending:
    """Encodings in flight on ``FastBPE``'s pool; ``result()`` assembles the pieces and audits."""

    def __init__(self, *, owner: FastBPE, texts: list[str], futures: list):
        self._owner, self._texts, self._futures = owner, texts, futures

    def result(self) -> list[np.ndarray]:
        parts = [[] for _ in self._texts]
        for i, _, fut in sorted(self._futures, key=lambda x: x[:2]):
            parts[i].append(fut.result())
        out = [p[0] if len(p) == 1 else np.concatenate(p) for p in parts]
        self._owner._audit(self._texts, out)
        return out
