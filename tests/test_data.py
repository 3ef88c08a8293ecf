"""Data pipeline: embedded corpus/tokenizer, packing and varlen against a hand-built reference, formats,
mixtures, shuffling, offline store, rank sharding and bad-input errors."""

import json
import os

import numpy as np
import pytest
from test_data_resume import ID_BASE, doc_text, make_tokenizer, write_corpus

from flame_gin.data import build_loader, embedded, source
from flame_gin.data.sources import open_split

BOS, EOS, PAD = 0, 1, 2


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {
        "dir": str(d),
        "tok": make_tokenizer(d / "tok"),
        "a": write_corpus(str(d), "a.jsonl", range(0, 60)),
        "b": write_corpus(str(d), "b.jsonl", range(100, 160)),
        "cache": str(d / "cache"),
    }


def loader(env, **kw):
    kw = {"seq_len": 16, "batch_size": 2, "seed": 0, "tokenizer": env["tok"], "cache_dir": env["cache"], **kw}
    return build_loader(**kw)


def reference_stream(env, ids):
    """BOS + tokens + EOS of each document, concatenated, tokenized independently of the loader."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(env["tok"])
    out = []
    for i in ids:
        out += [BOS] + tok(doc_text(i), add_special_tokens=False)["input_ids"] + [EOS]
    return np.asarray(out)


def test_packed_batches_match_reference_stream(env):
    ld = loader(env, sources=[env["a"]], shuffle=False, num_epochs=1)
    batches = list(ld)
    ref = reference_stream(env, range(60))
    inputs = np.concatenate([b["input_ids"].numpy().ravel() for b in batches])
    labels = np.concatenate([b["labels"].numpy().ravel() for b in batches])
    assert batches[0]["input_ids"].shape == (2, 16)
    n = len(ref) - 1
    np.testing.assert_array_equal(inputs[:n], ref[:-1])
    np.testing.assert_array_equal(labels[:n], ref[1:])
    assert (labels[n:] == -100).all() and (inputs[n:] == PAD).all()
    assert ld.tokens_per_source == {"a.jsonl": n}
    assert list(ld) == []  # a finite training loader stays exhausted


def test_varlen_marks_documents_and_masks_boundary_labels(env):
    ld = loader(env, sources=[env["a"]], shuffle=False, num_epochs=1, varlen=True, context_len=20, batch_size=3)
    ref_docs = [reference_stream(env, [i]) for i in range(60)]
    pieces = [d[j : j + 20] for d in ref_docs for j in range(0, len(d), 20)]
    flat = np.concatenate(pieces)
    starts = set(np.cumsum([0] + [len(p) for p in pieces])[:-1].tolist())
    pos = 0
    for b in ld:
        x, y, cu = b["input_ids"][0].numpy(), b["labels"][0].numpy(), b["cu_seqlens"].numpy()
        assert x.shape == (48,) and cu[0] == 0 and cu[-1] == 48 and (np.diff(cu) > 0).all()
        assert np.diff(cu).max() <= 20
        valid = min(48, len(flat) - 1 - pos)
        np.testing.assert_array_equal(x[:valid], flat[pos : pos + valid])
        for t in range(valid):
            boundary = (pos + t + 1) in starts
            assert y[t] == (-100 if boundary else flat[pos + t + 1])
            if boundary and t + 1 < 48:
                assert t + 1 in cu
        pos += valid
    assert pos == len(flat) - 1


@pytest.mark.parametrize("fmt", ["parquet", "text", "arrow", "dir", "data_files"])
def test_formats_give_the_same_batches(env, fmt):
    import datasets

    texts = [doc_text(i) for i in range(60)]
    d = os.path.join(env["dir"], f"fmt_{fmt}")
    os.makedirs(d, exist_ok=True)
    ds = datasets.Dataset.from_dict({"text": texts})
    if fmt == "parquet":
        src = {"path": ds.to_parquet(os.path.join(d, "x.parquet")) and os.path.join(d, "x.parquet")}
    elif fmt == "text":
        open(os.path.join(d, "x.txt"), "w").write("\n".join(texts) + "\n")
        src = {"path": os.path.join(d, "x.txt")}
    elif fmt == "arrow":
        ds.save_to_disk(os.path.join(d, "saved"))
        arrow = [f for f in os.listdir(os.path.join(d, "saved")) if f.endswith(".arrow")][0]
        src = {"path": "arrow", "data_files": os.path.join(d, "saved", arrow)}
    elif fmt == "dir":
        ds.to_json(os.path.join(d, "train.jsonl"))
        src = {"path": d}
    else:
        src = {"path": "json", "data_files": {"train": env["a"]}}
    got = [b["input_ids"].tolist() for b in loader(env, sources=[src], shuffle=False, num_epochs=1)]
    want = [b["input_ids"].tolist() for b in loader(env, sources=[env["a"]], shuffle=False, num_epochs=1)]
    assert got == want


def test_shuffle_exact_and_buffer_are_seeded_permutations(env):
    def order(**kw):
        ids = np.concatenate([b["input_ids"].numpy().ravel() for b in loader(env, num_epochs=1, **kw)])
        return [int(t) - ID_BASE for t in ids if ID_BASE <= t < ID_BASE + 60]

    plain = order(sources=[env["a"]], shuffle=False)
    assert plain == list(range(60))
    for kw in (dict(sources=[env["a"]]), dict(sources=[{"path": env["a"], "streaming": True}], buffer_size=10)):
        a, b, c = order(shuffle=True, **kw), order(shuffle=True, **kw), order(shuffle=True, seed=1, **kw)
        assert sorted(a) == plain and a == b and a != plain and a != c
    streamed = order(sources=[{"path": env["a"], "streaming": True}], shuffle=False)
    assert streamed == plain


def test_mixture_follows_probabilities_and_counts_tokens(env):
    ld = loader(env, sources=[env["a"], env["b"]], probabilities=[0.8, 0.2], batch_size=4)
    ids = np.concatenate([next(ld)["input_ids"].numpy().ravel() for _ in range(150)])
    docs = ids[(ids >= ID_BASE) & (ids < ID_BASE + 200)] - ID_BASE
    share_a = float(np.mean(docs < 100))
    assert 0.74 < share_a < 0.86, share_a
    counts = ld.tokens_per_source
    assert set(counts) == {"a.jsonl", "b.jsonl"} and sum(counts.values()) == 150 * 4 * 16


def test_ranks_read_disjoint_documents(env):
    seen = []
    for r in range(3):
        ld = loader(env, sources=[env["a"]], rank=r, world_size=3, num_epochs=1)
        ids = np.concatenate([b["input_ids"].numpy().ravel() for b in ld])
        seen.append({int(t) for t in ids if ID_BASE <= t < ID_BASE + 60})
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    assert len(seen[0] | seen[1] | seen[2]) == 60


def test_offline_store_gives_the_same_batches(env):
    kw = dict(sources=[env["a"]], batch_size=3)
    online = loader(env, **kw)
    offline = loader(env, offline=True, **kw)
    assert [next(online)["input_ids"].tolist() for _ in range(6)] == [
        next(offline)["input_ids"].tolist() for _ in range(6)
    ]
    stores = os.listdir(os.path.join(env["cache"], "token_stores"))
    assert len(stores) == 1


@pytest.mark.slow
def test_embedded_corpus_and_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    d = embedded.corpus_dir(cache_dir=tmp_path)
    lines = (d / "validation.jsonl").read_text().splitlines()
    assert lines and "def " in "".join(json.loads(x)["text"] for x in lines)
    path = embedded.tokenizer_path(cache_dir=tmp_path, vocab_size=300)
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == 300 and tok.bos_token == "<s>" and tok.eos_token == "</s>"
    text = "def f(x):\n    return x + 1\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    again = embedded.tokenizer_path(cache_dir=tmp_path / "other", vocab_size=300)
    assert open(os.path.join(path, "tokenizer.json")).read() == open(os.path.join(again, "tokenizer.json")).read()
    ld = build_loader(tokenizer=path, seq_len=32, batch_size=2, split="validation", cache_dir=tmp_path)
    first = next(iter(ld))
    assert first["input_ids"].max() < 300 and ld.vocab_size == 300
    runs = [[b["input_ids"].tolist() for b, _ in zip(ld, range(5))] for _ in range(2)]
    assert runs[0] == runs[1] and runs[0][0] == first["input_ids"].tolist()  # eval restarts, deterministic


@pytest.mark.parametrize(
    "kw,exc,names",
    [
        (dict(sources=["/nope/missing.jsonl"]), FileNotFoundError, "/nope/missing.jsonl"),
        (dict(sources=[{"path": "json", "data_files": "/nope/x.jsonl"}]), FileNotFoundError, "/nope/x.jsonl"),
        (dict(sources=[{"path": "/nope/dir"}]), FileNotFoundError, "/nope/dir"),
        (dict(probabilities=[0.5]), ValueError, "[0.5]"),
        (dict(probabilities=[0.6, 0.6]), ValueError, "[0.6, 0.6]"),
        (dict(tokenizer="/nope/tok"), FileNotFoundError, "/nope/tok"),
        (dict(text_field="body"), KeyError, "'body'"),
    ],
)
def test_bad_input_is_named(env, kw, exc, names):
    if "text_field" in kw:
        kw = dict(sources=[{"path": env["a"], "text_field": kw["text_field"]}])
    kw.setdefault("sources", [env["a"], env["b"]] if "probabilities" in kw else [env["a"]])
    with pytest.raises(exc) as e:
        loader(env, **kw)
    assert names in str(e.value)
    if "text_field" in str(kw):
        assert "'meta'" in str(e.value) and "'text'" in str(e.value)


def test_empty_dataset_and_unreadable_tokenizer(env, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises((ValueError, RuntimeError)) as e:
        loader(env, sources=[str(empty)])
    assert str(empty) in str(e.value)
    bad = tmp_path / "badtok"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="badtok.*a local directory that holds no loadable tokenizer"):
        loader(env, tokenizer=str(bad), sources=[env["a"]])
    with pytest.raises(ValueError, match="validation"):
        loader(env, sources=[source(path=env["a"])], split="validation")


def test_hub_name_goes_through_load_dataset_and_fails_clearly_offline(env, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises((ConnectionError, RuntimeError, OSError)) as e:
        loader(env, sources=[{"path": "someorg/some-dataset", "name": "cfg", "streaming": True}])
    assert "someorg/some-dataset" in str(e.value) and "Hub" in str(e.value)


def test_a_malformed_or_empty_jsonl_is_named_by_file_and_line(tmp_path, env):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",\n{"text": "d"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 3 is not valid JSON"):
        open_split(source(path=str(bad)), split="train", cache_dir=env["cache"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty.jsonl is empty"):
        open_split(source(path=str(empty)), split="train", cache_dir=env["cache"])
