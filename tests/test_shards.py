"""Streaming sources read by blocks: each stream reads only its share, a resume re-reads only what is in progress.

Corpora are local shards as users keep them (JSON-lines files; parquet files of several row groups). Every
document carries a unique id token, so documents are counted: each is read exactly once per epoch, whatever the
number of streams, and resumes with another number of streams neither skip nor repeat one.
"""

import collections
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_resume import ID_BASE, N_DOCS, doc_text, make_tokenizer, write_corpus

from flame_gin.data import build_loader, shards, source


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    jsonl = d / "jsonl"
    jsonl.mkdir()
    for k in range(4):
        write_corpus(str(jsonl), f"train-{k}.jsonl", range(k * 60, (k + 1) * 60))
    parquet = d / "parquet"
    parquet.mkdir()
    for k in range(3):
        ids = range(k * 80, (k + 1) * 80)
        table = pa.table({"id": list(ids), "text": [doc_text(i) for i in ids]})
        pq.write_table(table, parquet / f"train-{k}.parquet", row_group_size=10)
    text = d / "text.txt"
    text.write_text("".join(doc_text(i) + "\n" for i in range(N_DOCS)))
    return {"tok": make_tokenizer(d / "tok"), "jsonl": str(jsonl), "parquet": str(parquet), "text": str(text)}


def plan_of(env, corpus=None, **kw):
    """The plan of one streaming source (``env[corpus]``, or ``sources`` given in ``kw``), as the loader makes it."""
    kw = {"seq_len": 16, "batch_size": 2, "seed": 5, "num_epochs": 1, "block_bytes": 700, **kw}
    sources = kw.pop("sources", None) or [source(path=env[corpus], streaming=True)]
    return build_loader(tokenizer=env["tok"], sources=sources, **kw).plan


def ids_of(batch):
    ids = np.asarray(batch["input_ids"]).ravel()
    return [int(t) - ID_BASE for t in ids if ID_BASE <= t < ID_BASE + N_DOCS]


def drain(stream):
    out = []
    while (b := stream.next_batch()) is not None:
        out.append(b)
    return out


@pytest.mark.parametrize("corpus", ["jsonl", "parquet"])
def test_n_streams_read_the_corpus_once_each_its_share(env, corpus):
    plan = plan_of(env, corpus)
    assert plan.kinds == ["blocks"]
    blocks = plan.datasets[0]
    assert len(blocks) >= 16  # 4 files x ~7 byte ranges, or 3 files x 8 row groups
    docs, reads = {}, {}
    for n in (1, 4):
        streams = [plan.make_stream(stream=g, num_streams=n, generation=0, state=None) for g in range(n)]
        per_stream = [collections.Counter(i for b in drain(s) for i in ids_of(b)) for s in streams]
        docs[n] = sum(per_stream, collections.Counter())
        reads[n] = [s.readers[0].bytes_read for s in streams]
        shares = [sum(c.values()) / N_DOCS for c in per_stream]
        assert max(shares) < 1.5 / n, f"{n} streams: shares of the documents {shares}"
    for n in (1, 4):
        assert sorted(docs[n]) == list(range(N_DOCS)) and set(docs[n].values()) == {1}
        assert sum(reads[n]) == blocks.total_bytes  # every block fetched once by one stream
    assert max(reads[4]) < 0.5 * blocks.total_bytes


def test_the_global_order_does_not_depend_on_the_number_of_streams(env):
    """Which documents fill which block position of the epoch's order, in which order: the same for 1 and 3
    streams (the order is a function of the files, the seed and the epoch), and shuffled."""
    plan = plan_of(env, "jsonl")
    by_position = {}
    for n in (1, 3):
        by_position[n] = collections.defaultdict(list)
        for g in range(n):
            reader = plan.make_stream(stream=g, num_streams=n, generation=0, state=None).readers[0]
            while True:
                positions, texts = reader.read(5)
                if not texts:
                    break
                for p, t in zip(positions, texts):
                    by_position[n][p].append(t)
    assert by_position[1] == by_position[3]
    flat = [t for p in sorted(by_position[1]) for t in by_position[1][p]]
    assert sorted(flat) == sorted(doc_text(i) for i in range(N_DOCS)) and flat != [doc_text(i) for i in range(N_DOCS)]


@pytest.mark.parametrize("corpus", ["jsonl", "parquet"])
def test_a_resume_mid_epoch_reads_only_the_block_in_progress(env, corpus):
    plan = plan_of(env, corpus, num_epochs=None)
    blocks = plan.datasets[0]
    largest = int((blocks.b - blocks.a).max()) if blocks.kind == shards._JSONL else int(blocks.b.max())
    stream = plan.make_stream(stream=0, num_streams=1, generation=0, state=None)
    for _ in range(100):  # about half of the epoch's ~190 batches
        stream.next_batch()
    assert 0.4 * blocks.total_bytes < stream.readers[0].bytes_read < 0.7 * blocks.total_bytes
    state = json.loads(json.dumps(stream.state_dict()))
    resumed = plan.make_stream(stream=0, num_streams=1, generation=0, state=state)
    first = resumed.next_batch()
    assert resumed.readers[0].bytes_read <= largest  # the block in progress, nothing before it
    expected = stream.next_batch()
    assert all(np.array_equal(expected[k], first[k]) for k in expected)
    for _ in range(5):
        a, b = stream.next_batch(), resumed.next_batch()
        assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("old,new", [(1, 3), (3, 2)])
def test_resume_with_other_stream_counts_reads_every_parquet_document_once(env, old, new):
    kw = dict(
        tokenizer=env["tok"],
        seq_len=16,
        batch_size=2,
        seed=3,
        num_epochs=1,
        sources=[source(path=env["parquet"], streaming=True)],
    )
    loaders = [build_loader(rank=r, world_size=old, **kw) for r in range(old)]
    before = [next(ld) for r, ld in enumerate(loaders) for _ in range(4 + 3 * r)]
    states = [json.loads(json.dumps(ld.state_dict())) for ld in loaders]
    assert any(st["streams"][0]["readers"][0]["partial"] for st in states)  # blocks in progress are handed over
    after = []
    for r in range(new):
        ld = build_loader(rank=r, world_size=new, **kw)
        ld.load_state_dict(states)
        after += list(ld)
    seen = collections.Counter(i for b in before + after for i in ids_of(b))
    assert sorted(seen) == list(range(N_DOCS)) and set(seen.values()) == {1}


def test_other_formats_are_streamed_whole_and_a_bad_row_names_its_file(env, tmp_path):
    assert plan_of(env, "text").kinds == ["stream"]
    bad = tmp_path / "bad"
    bad.mkdir()
    write_corpus(str(bad), "a.jsonl", range(20))
    with open(bad / "a.jsonl", "a") as f:
        f.write(json.dumps({"text": None}) + "\n")
    plan = plan_of({**env, "bad": str(bad)}, "bad", shuffle=False)
    with pytest.raises(ValueError, match=r"a\.jsonl bytes .*no text in field 'text'"):
        drain(plan.make_stream(stream=0, num_streams=1, generation=0, state=None))
    os.remove(bad / "a.jsonl")


def test_a_state_saved_under_another_reading_is_refused_by_name(env):
    kw = dict(tokenizer=env["tok"], seq_len=16, batch_size=2, seed=3)
    by_blocks = build_loader(sources=[source(path=env["parquet"], streaming=True)], **kw)
    next(by_blocks)
    whole = build_loader(sources=[source(path=env["parquet"])], **kw)
    with pytest.raises(ValueError, match="reads it as 'blocks', this loader as 'map'"):
        whole.load_state_dict(by_blocks.state_dict())


def test_resuming_a_run_whose_source_is_read_another_way_is_a_checkpoint_error(tmp_path, train_tiny):
    from flame_gin.checkpoint import CheckpointError

    corpus = write_corpus(str(tmp_path), "c.jsonl", range(N_DOCS))

    def sources(streaming):
        return f"flame_gin.build_loader.sources = [{{'path': {corpus!r}, 'holdout': 0.1, 'streaming': {streaming}}}]"

    train_tiny(tmp_path / "run", steps=2, bindings=(sources(True),))
    with pytest.raises(
        CheckpointError, match=r"step 2: data loader state: .*reads it as 'blocks', this loader as 'map'"
    ):
        train_tiny(tmp_path / "run", steps=4, bindings=(sources(False),))


def test_remote_files_are_read_by_blocks_through_fsspec(env):
    """A URL (here fsspec's in-memory file system; ``hf://`` for the hub) is listed, sized and read by blocks."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for k in range(2):
        with fs.open(f"/shards_test/train-{k}.jsonl", "wb") as f:
            f.write("".join(json.dumps({"text": doc_text(i)}) + "\n" for i in range(k * 120, (k + 1) * 120)).encode())
    try:
        memory = source(path="json", data_files={"train": "memory://shards_test/*.jsonl"}, streaming=True)
        plan = plan_of(env, sources=[memory], seed=1, block_bytes=900)
        assert plan.kinds == ["blocks"] and plan.datasets[0].files[0].startswith("memory://")
        streams = [plan.make_stream(stream=g, num_streams=2, generation=0, state=None) for g in range(2)]
        seen = collections.Counter(i for s in streams for b in drain(s) for i in ids_of(b))
        assert sorted(seen) == list(range(N_DOCS)) and set(seen.values()) == {1}
        assert sum(s.readers[0].bytes_read for s in streams) == plan.datasets[0].total_bytes
    finally:
        fs.rm("/shards_test", recursive=True)


def test_the_block_index_of_pinned_hub_files_is_listed_once_and_kept(tmp_path):
    pinned = [f"hf://datasets/org/corpus@{'a' * 40}/data/train-{k}.parquet" for k in range(3)]
    assert (
        shards.index_cache(pinned[:1] + ["/local/file.parquet"], field="text", kind=0, block_bytes=1, cache_dir=None)
        is None
    )
    assert (
        shards.index_cache(
            ["hf://datasets/org/corpus/data/x.parquet"], field="text", kind=0, block_bytes=1, cache_dir=None
        )
        is None
    )
    where = shards.index_cache(pinned, field="text", kind=0, block_bytes=1, cache_dir=str(tmp_path))
    assert where is not None and where.parent.parent == tmp_path
    assert where != shards.index_cache(pinned, field="body", kind=0, block_bytes=1, cache_dir=str(tmp_path))
    calls = []

    def listing():
        calls.append(1)
        return np.arange(9, dtype=np.int64).reshape(3, 3)

    first = shards.cached(where, listing)
    again = shards.cached(where, listing)
    assert len(calls) == 1 and np.array_equal(first, again) and np.array_equal(first, listing())
