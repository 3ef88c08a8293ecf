"""Token stores built before training: in parallel (byte-identical to one process), resumed after an
interruption (only the unfinished part is tokenized again), ingested from a foreign token array, and read by a
run: the prepare command builds exactly the stores offline mode looks for, and a source naming an ingested
corpus folder trains."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from flame_gin.data import embedded, plan, store, store_build

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus():
    """The embedded corpus's first 400 documents and its tokenizer's folder."""
    with open(embedded.corpus_dir() / "train.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line, _ in zip(f, range(400))]
    return texts, embedded.tokenizer_path()


def _make_tokenize(path):
    return functools.partial(plan.load_tokenize, path, fast=True, audit_every=0)


def _bytes(directory):
    return (directory / store.TOKENS_FILE).read_bytes(), np.load(directory / store.OFFSETS_FILE).tolist()


class _Counting:
    """An in-process tokenizer that counts the documents it tokenized."""

    def __init__(self, path):
        self.inner, self.count = _make_tokenize(path)(), 0

    def __call__(self, texts):
        self.count += len(texts)
        return self.inner(texts)


@pytest.mark.slow
def test_parallel_build_is_the_serial_one_and_an_interrupted_build_resumes(tmp_path, corpus, monkeypatch):
    texts, tok = corpus
    monkeypatch.setattr(store_build, "CHUNK_DOCS", 50)
    monkeypatch.setattr(store_build, "PART_CHUNKS", 2)  # a part every 100 documents
    serial = store_build.build_store(
        texts=texts, make_tokenize=_make_tokenize(tok), vocab_size=512, directory=tmp_path / "serial"
    )
    parallel = store_build.build_store(
        texts=texts, make_tokenize=_make_tokenize(tok), vocab_size=512, directory=tmp_path / "parallel", processes=2
    )
    assert _bytes(serial.directory) == _bytes(parallel.directory)
    assert len(serial) == len(texts) == 400 and serial.meta["dtype"] == "uint16"
    reference = _make_tokenize(tok)()(texts[:3])  # the HF-exact tokenizer, called directly
    assert [a.tolist() for a in serial.fetch([0, 1, 2])] == [r.tolist() for r in reference]

    def interrupted():
        yield from texts[:250]
        raise KeyboardInterrupt  # the node goes away mid-build

    with pytest.raises(KeyboardInterrupt):
        store_build.build_store(
            texts=interrupted(), make_tokenize=_make_tokenize(tok), vocab_size=512, directory=tmp_path / "resumed"
        )
    assert not store.is_store(tmp_path / "resumed")  # nothing half-built is ever taken for a store
    counting = _Counting(tok)
    resumed = store_build.build_store(
        texts=texts, make_tokenize=lambda: counting, vocab_size=512, directory=tmp_path / "resumed"
    )
    assert counting.count == 200  # the two committed parts (200 documents) were not tokenized again
    assert _bytes(resumed.directory) == _bytes(serial.directory)
    assert not (tmp_path / ".resumed.partial").exists()

    # A crash after the parts were joined (here: writing the meta) leaves only the clean-up to do.
    real_write_meta = store.write_meta

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "write_meta", crash)
    with pytest.raises(KeyboardInterrupt):
        store_build.build_store(
            texts=texts, make_tokenize=_make_tokenize(tok), vocab_size=512, directory=tmp_path / "late"
        )
    monkeypatch.setattr(store, "write_meta", real_write_meta)

    def must_not_tokenize():
        raise AssertionError("the joined parts were tokenized again")

    late = store_build.build_store(
        texts=texts, make_tokenize=must_not_tokenize, vocab_size=512, directory=tmp_path / "late"
    )
    assert _bytes(late.directory) == _bytes(serial.directory) and late.meta["documents"] == 400
    assert sorted(p.name for p in late.directory.iterdir()) == sorted(
        [store.TOKENS_FILE, store.OFFSETS_FILE, store.META_FILE]
    )


def test_ingest_cuts_documents_at_the_separator_or_the_offsets(tmp_path):
    docs = [[5, 6, 7], [8], [9, 10]]
    flat = np.array([t for d in docs for t in [*d, 2]], dtype=np.uint16)  # 2 ends every document (dropped)
    flat.tofile(tmp_path / "a.bin")
    by_separator = store_build.ingest(tokens=tmp_path / "a.bin", dtype="uint16", separator=2, directory=tmp_path / "s")
    assert [a.tolist() for a in by_separator.fetch([0, 1, 2])] == docs
    np.save(tmp_path / "bounds.npy", np.array([0, 4, 6, 9], dtype=np.int64))
    by_offsets = store_build.ingest(
        tokens=tmp_path / "a.bin", dtype="uint16", offsets=tmp_path / "bounds.npy", directory=tmp_path / "o"
    )
    assert [a.tolist() for a in by_offsets.fetch([0, 1, 2])] == [[5, 6, 7, 2], [8, 2], [9, 10, 2]]
    np.save(tmp_path / "bad.npy", np.array([0, 4, 99], dtype=np.int64))
    with pytest.raises(ValueError, match="bad.npy must rise from 0 to the token count 9"):
        store_build.ingest(
            tokens=tmp_path / "a.bin", dtype="uint16", offsets=tmp_path / "bad.npy", directory=tmp_path / "x"
        )
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_prepare_command_builds_what_the_offline_run_reads_and_an_ingested_corpus_trains(tmp_path, corpus, train_tiny):
    texts, tok = corpus
    cache = tmp_path / "cache"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    gin_args = [
        "--gin_file=gin/tiny.gin",
        "--gin_file=gin/data/offline.gin",
        f"--gin.flame_gin.build_loader.cache_dir='{cache}'",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "flame_gin.data.prepare", *gin_args, "--processes=2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])["prepare"]
    assert {r["split"] for r in report} == {"train", "validation"} and all(r["tokens"] > 0 for r in report)
    # The run finds them: the offline run (in this process) tokenizes nothing and builds no other store.
    stamps = {r["directory"]: os.stat(pathlib.Path(r["directory"]) / store.TOKENS_FILE).st_mtime_ns for r in report}
    train_tiny(  # evaluation on: the held-out store is read too
        tmp_path / "run",
        steps=2,
        gin_files=("gin/data/offline.gin",),
        bindings=(f"flame_gin.build_loader.cache_dir = '{cache}'", "flame_gin.evaluation.interval = 2"),
    )
    assert stamps == {d: os.stat(pathlib.Path(d) / store.TOKENS_FILE).st_mtime_ns for d in stamps}
    assert sorted(p.name for p in (cache / "token_stores").iterdir()) == sorted(pathlib.Path(d).name for d in stamps)

    # A corpus tokenized elsewhere: ingested per split (the command for one, the library for the other), named
    # by its folder, trained on with evaluation.
    tokenize = _make_tokenize(tok)()
    for split, part in (("train", texts[:350]), ("validation", texts[350:])):
        ids = np.concatenate([np.append(a, 1) for a in tokenize(part)]).astype(np.uint16)  # 1 is </s>
        ids.tofile(tmp_path / f"{split}.bin")
    ingested = subprocess.run(
        [
            sys.executable,
            "-m",
            "flame_gin.data.prepare",
            f"--ingest_tokens={tmp_path / 'train.bin'}",
            "--separator=1",
            f"--out={tmp_path / 'corpus' / 'train'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ingested.returncode == 0, ingested.stderr[-3000:]
    assert json.loads(ingested.stdout.strip().splitlines()[-1])["prepare"][0]["documents"] == 350
    store_build.ingest(
        tokens=tmp_path / "validation.bin", dtype="uint16", separator=1, directory=tmp_path / "corpus" / "validation"
    )
    workdir = train_tiny(
        tmp_path / "ingested_run",
        steps=2,
        bindings=(
            f"flame_gin.build_loader.sources = [{{'path': '{tmp_path / 'corpus'}'}}]",
            "flame_gin.evaluation.interval = 2",
        ),
    )
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval_loss")] == [2] and [e.step for e in events.Scalars("loss")][-1] == 2


def test_an_ingested_corpus_is_read_in_its_document_order(tmp_path, corpus):
    """The loader over an ingested store packs its documents as the plain reference does: in order (shuffle
    off), each followed by the tokenizer's </s>, cut into rows of seq_len + 1."""
    from flame_gin.data import loader as loader_lib

    _, tok = corpus
    docs = [list(range(10 + i, 10 + i + n)) for i, n in enumerate([7, 3, 12, 5, 9, 30, 4, 8])]
    flat = np.array([t for d in docs for t in [*d, 1]], dtype=np.uint16)
    flat.tofile(tmp_path / "t.bin")
    store_build.ingest(tokens=tmp_path / "t.bin", dtype="uint16", separator=1, directory=tmp_path / "c" / "train")
    loader = loader_lib.build_loader(
        tokenizer="embedded",
        seq_len=8,
        batch_size=2,
        rank=0,
        world_size=1,
        seed=0,
        split="train",
        sources=[{"path": str(tmp_path / "c")}],
        shuffle=False,
        add_bos=False,
        num_epochs=1,
    )
    batch = next(iter(loader))
    stream = [t for d in docs for t in [*d, 1]]  # the reference: documents in order, each ended by </s>
    assert batch["input_ids"].tolist() == [stream[0:8], stream[8:16]]
    assert batch["labels"].tolist() == [stream[1:9], stream[9:17]]
