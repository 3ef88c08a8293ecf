"""A corpus and tokenizer that need nothing but the running Python.

The default run must train with no network and no third-party text committed to the repository, so the
corpus is made on first use from the Python standard library's own ``.py`` sources (one document per file,
test suites left out), written as ``train.jsonl`` / ``validation.jsonl``, and a small byte-level BPE
tokenizer is trained on part of it with the ``tokenizers`` library and saved as a
``PreTrainedTokenizerFast`` directory (loadable with ``AutoTokenizer.from_pretrained``).

Both are cached under ``cache_dir`` (default ``~/.cache/flame_gin``, or ``$FLAME_GIN_CACHE``), keyed by the
Python version, and built deterministically: sorted file order, a fixed train/validation rule, and a
single-threaded tokenizer trainer. A build writes into a temporary directory and renames it into place, so
concurrent first uses never see a half-written cache.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import sysconfig
import tempfile

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")
_SKIPPED_PARTS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})
_VALIDATION_EVERY = 20  # every 20th file (in sorted order) is held out
_TOKENIZER_TRAIN_BYTES = 3_000_000


def default_cache_dir() -> pathlib.Path:
    """Where cached corpora, tokenizers and token stores live unless a caller says otherwise."""
    env = os.environ.get("FLAME_GIN_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "flame_gin"


def _stdlib_sources() -> list[pathlib.Path]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not (_SKIPPED_PARTS & set(p.relative_to(root).parts))]
    if not files:
        raise FileNotFoundError(f"no Python standard library sources found under {root}")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _publish(tmp: pathlib.Path, final: pathlib.Path) -> None:
    """Renames a finished build into place; a racing builder that lost simply discards its copy."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def corpus_dir(*, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Returns a directory holding ``train.jsonl`` and ``validation.jsonl`` ({"text": ...} per line).

    Built once from the standard library sources and cached; later calls only check that it exists.
    """
    base = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    final = base / f"stdlib_corpus_{tag}"
    if (final / "validation.jsonl").exists():
        return final
    base.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=base, prefix=".corpus-"))
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    with (
        open(tmp / "train.jsonl", "w", encoding="utf-8") as train,
        open(tmp / "validation.jsonl", "w", encoding="utf-8") as valid,
    ):
        for i, path in enumerate(_stdlib_sources()):
            text = path.read_bytes().decode("utf-8", errors="replace")
            if not text.strip():
                continue
            out = valid if i % _VALIDATION_EVERY == _VALIDATION_EVERY - 1 else train
            out.write(json.dumps({"text": text, "source": path.relative_to(root).as_posix()}) + "\n")
    _publish(tmp, final)
    return final


def training_texts(train_file: pathlib.Path, budget: int):
    """The texts of a jsonl file, in order, until ``budget`` characters have been yielded (tokenizer training)."""
    used = 0
    with open(train_file, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            yield text
            used += len(text)
            if used >= budget:
                return


def train_bpe(*, texts, vocab_size: int, output_dir: str | os.PathLike) -> None:
    """Trains a byte-level BPE on ``texts`` and saves it as a ``PreTrainedTokenizerFast`` directory.

    Shared by the embedded default and the throughput benchmark (which trains a 32K vocabulary).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(output_dir))


def tokenizer_path(*, cache_dir: str | os.PathLike | None = None, vocab_size: int = 512) -> str:
    """Returns the path of a byte-level BPE tokenizer trained on the embedded corpus (cached).

    Training runs with the tokenizer library's threads pinned to one, so the merges (and thus every token id)
    are the same on every machine that has the same Python version.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is below the 256 byte symbols plus special tokens")
    corpus = corpus_dir(cache_dir=cache_dir)
    final = corpus.parent / f"{corpus.name}_bpe{vocab_size}"
    if (final / "tokenizer.json").exists():
        return str(final)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=corpus.parent, prefix=".tokenizer-"))
    previous = os.environ.get("RAYON_NUM_THREADS")
    os.environ["RAYON_NUM_THREADS"] = "1"
    try:
        train_bpe(
            texts=training_texts(corpus / "train.jsonl", _TOKENIZER_TRAIN_BYTES), vocab_size=vocab_size, output_dir=tmp
        )
    finally:
        if previous is None:
            os.environ.pop("RAYON_NUM_THREADS", None)
        else:
            os.environ["RAYON_NUM_THREADS"] = previous
    _publish(tmp, final)
    return str(final)


def resolve_tokenizer(name: str | None) -> str | None:
    """A tokenizer folder or hub name as given; ``"embedded"`` is the embedded default run's tokenizer."""
    return tokenizer_path() if name == "embedded" else name
