"""Exact resume of the data loader across processes, and resume with other numbers of ranks or workers.

Resume: batches of an uninterrupted run are compared with k batches + saved state + a NEW process that loads
the state and produces the rest, for map-style, streaming, a mixture, varlen and 2 workers.
Resharding: every document carries a unique id token; documents are counted across the save/resume point
to prove none is read twice or skipped (the documented granularity is one document: zero loss).
"""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flame_gin.data import build_loader, source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_DOCS = 240
ID_BASE = 4  # token ids of d0..d{N-1} start here (after the special tokens)


def make_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "</s>", "<pad>", "[UNK]"] + [f"d{i}" for i in range(N_DOCS)] + [f"w{i}" for i in range(50)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="[UNK]"
    )
    fast.save_pretrained(str(directory))
    return str(directory)


def doc_text(i):
    return f"d{i} " + " ".join(f"w{(i * 7 + j) % 50}" for j in range(3 + (i * 13) % 40))


def write_corpus(directory, name, ids):
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        for i in ids:
            f.write(json.dumps({"text": doc_text(i), "meta": i}) + "\n")
    return path


def _write_lines(path, ids):
    path.write_text("".join(doc_text(i) + "\n" for i in ids))
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("data_resume")
    return {
        "tok": make_tokenizer(d / "tok"),
        "a": write_corpus(str(d), "a.jsonl", range(0, 160)),
        "b": write_corpus(str(d), "b.jsonl", range(160, N_DOCS)),
        "a_text": _write_lines(d / "a.txt", range(0, 160)),
        "cache": str(d / "cache"),
    }


def cases(env):
    a = {"path": env["a"]}
    return {
        "map": dict(sources=[a]),
        "streaming": dict(sources=[{**a, "streaming": True}], buffer_size=16),
        "mixture": dict(sources=[a, {"path": env["b"], "streaming": True}], probabilities=[0.7, 0.3], buffer_size=8),
        "varlen": dict(sources=[a], varlen=True, context_len=12),
        "workers2": dict(sources=[a], num_workers=2),
    }


def loader(env, rank=0, world_size=1, **kw):
    kw = {"seq_len": 16, "batch_size": 2, "seed": 3, "block_bytes": 512, **kw}
    return build_loader(tokenizer=env["tok"], rank=rank, world_size=world_size, cache_dir=env["cache"], **kw)


def as_lists(batches):
    return [{k: v.tolist() for k, v in b.items()} for b in batches]


def _resume_main(env, states_file, out_file, n_rest):
    states = json.load(open(states_file))
    out = {}
    for name, kw in cases(env).items():
        ld = loader(env, **kw)
        ld.load_state_dict(states[name])
        out[name] = as_lists([next(ld) for _ in range(n_rest)])
    json.dump(out, open(out_file, "w"))


@pytest.mark.slow
def test_exact_resume_in_new_process(env, tmp_path):
    n, k = 9, 5  # k odd: with 2 workers the resumed loader must start at worker 1
    full, states = {}, {}
    for name, kw in cases(env).items():
        ld = loader(env, **kw)
        full[name] = as_lists([next(ld) for _ in range(n)])
        ld = loader(env, **kw)
        head = [next(ld) for _ in range(k)]
        assert as_lists(head) == full[name][:k], name
        states[name] = json.loads(json.dumps(ld.state_dict()))
    states_file, out_file = tmp_path / "states.json", tmp_path / "out.json"
    states_file.write_text(json.dumps(states))
    subprocess.run(
        [sys.executable, __file__, json.dumps(env), str(states_file), str(out_file), str(n - k)],
        check=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    rest = json.loads(out_file.read_text())
    for name in cases(env):
        assert rest[name] == full[name][k:], f"{name}: resumed batches differ"
    assert "cu_seqlens" in full["varlen"][0]


def _doc_counts(batches):
    counts = collections.Counter()
    for b in batches:
        ids = np.asarray(b["input_ids"]).ravel()
        counts.update(int(t) - ID_BASE for t in ids if ID_BASE <= t < ID_BASE + N_DOCS)
    return counts


def _drain(ld):
    return [b for b in ld]


@pytest.mark.parametrize(
    "old_ws,new_ws,kind",
    [
        (2, 1, "map"),
        (1, 2, "map"),
        (2, 1, "streaming"),
        (1, 3, "streaming"),
        (2, 1, "replay"),
        (2, 1, "store"),
        (1, 3, "store"),
    ],
)
def test_resume_with_other_rank_count_reads_every_document_once(env, old_ws, new_ws, kind):
    """``streaming``: JSON lines read by blocks; ``replay``: plain text, which every stream reads whole;
    ``store``: the offline token store, which every rank reads memory-mapped (as after data.prepare)."""
    kw = dict(
        sources=[source(path=env["a_text" if kind == "replay" else "a"], streaming=kind in ("streaming", "replay"))],
        num_epochs=1,
        buffer_size=8,
        offline=kind == "store",
    )
    old = [loader(env, rank=r, world_size=old_ws, **kw) for r in range(old_ws)]
    assert bool(old[0].stores()) == (kind == "store")
    before = []
    for r, ld in enumerate(old):
        before += [next(ld) for _ in range(3 + 2 * r)]  # ranks at different depths, as after a crash
    states = [json.loads(json.dumps(ld.state_dict())) for ld in old]
    after = []
    for r in range(new_ws):
        ld = loader(env, rank=r, world_size=new_ws, **kw)
        ld.load_state_dict(states)
        after += _drain(ld)
    seen = _doc_counts(before) + _doc_counts(after)
    assert set(seen) == set(range(160)), f"skipped: {sorted(set(range(160)) - set(seen))}"
    assert max(seen.values()) == 1, f"read twice: {[d for d, c in seen.items() if c > 1]}"
    assert _doc_counts(before) and _doc_counts(after)


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_with_other_worker_count_reads_every_document_once(env, streaming):
    kw = dict(sources=[{"path": env["a"], "streaming": streaming}], num_epochs=1)
    ld = loader(env, num_workers=2, **kw)
    before = [next(ld) for _ in range(5)]
    state = ld.state_dict()
    ld2 = loader(env, num_workers=0, **kw)
    two_ranks = loader(env, rank=0, world_size=2, **kw).state_dict()
    with pytest.raises(ValueError, match="list of every rank"):
        loader(env, **kw).load_state_dict(two_ranks)
    ld2.load_state_dict([state])
    seen = _doc_counts(before) + _doc_counts(_drain(ld2))
    assert set(seen) == set(range(160)) and max(seen.values()) == 1


def test_single_stream_reads_each_document_once_per_epoch(env):
    ld = loader(env, sources=[{"path": env["a"]}], num_epochs=2)
    seen = _doc_counts(_drain(ld))
    assert set(seen) == set(range(160)) and set(seen.values()) == {2}


if __name__ == "__main__":
    _resume_main(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))


def test_a_dropped_two_worker_loader_stops_its_workers_without_the_cyclic_collector(env):
    """A loader left mid-epoch (an evaluation's, or one dropped after ``next``) is freed by reference counting,
    so its DataLoader iterator sends the workers their stop signal at once. When the loader and its batch
    generator formed a cycle, only the cyclic collector freed them; it closed the DataLoader's queues first, and
    each worker then waited out torch's 5 s join (10 s per abandoned 2-worker loader, at every evaluation)."""
    import gc
    import multiprocessing

    before = set(multiprocessing.active_children())
    ld = loader(env, **cases(env)["workers2"])
    [next(ld) for _ in range(3)]
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert len(workers) == 2
    gc.disable()
    try:
        del ld
        for p in workers:
            p.join(timeout=20)
        assert [p.exitcode for p in workers] == [0, 0]
    finally:
        gc.enable()
