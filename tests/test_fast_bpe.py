"""The fast BPE path against the HF tokenizer it stands in for: same ids on varied text, a vocabulary where
rank-based merging would differ, tokenizers it must decline, the audit, threads and forked workers."""

import json
import random

import numpy as np
import pytest

from flame_gin.data import build_loader, embedded, fast_bpe

_SCRIPTS = [
    "hello",
    "Straße",
    "naïve",
    "Ünïcödé",
    "日本語の文",
    "中文字符",
    "русский",
    "ελληνικά",
    "עברית",
    "العربية",
    "हिन्दी",
    "한국어",
    "🙂🚀",
    "e\u0301",
    "x\u200dy",
    "\u00a0",
    "\u3000",
    "\t\t",
    "\r\n",
    "don't",
    "I'll",
    "we've",
    "O'Neil's",
    "3.14159",
    "٣٤٥",
    "1_000_000",
    "<s>",
    "</s>",
    "<pad>",
    "<s",
    "  ",
    "    \n",
    "def f(x):",
    "return x**2",
    "#!",
    "\\u00e9",
    "",
    "'",
    "''s",
    "\x00",
    "\x7f",
]


def _mixed_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(_SCRIPTS) for _ in range(rng.randint(1, 60))]
        seps = [rng.choice([" ", "", "\n", "  ", "\t", ", ", " '"]) for _ in words]
        out.append("".join(w + s for w, s in zip(words, seps)))
    return out


@pytest.fixture(scope="module")
def mixed_tokenizer(tmp_path_factory):
    """A byte-level BPE trained on source code plus the mixed-script texts (vocabulary 1,200)."""
    d = tmp_path_factory.mktemp("fast_bpe")
    corpus = embedded.corpus_dir(cache_dir=d)
    code = list(embedded.training_texts(corpus / "train.jsonl", 300_000))
    embedded.train_bpe(texts=code + _mixed_texts(3000, seed=1), vocab_size=1200, output_dir=d / "tok")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d / "tok")), code


def _hf_ids(tok, texts):
    return [tok.backend_tokenizer.encode(t, add_special_tokens=False).ids for t in texts]


def test_same_ids_as_hf_on_code_and_mixed_scripts(mixed_tokenizer):
    tok, code = mixed_tokenizer
    fast, why = fast_bpe.compile_fast(tok, audit_every=0)
    assert why is None, why
    texts = code[:200] + _mixed_texts(2000, seed=2)
    got = fast(texts)
    assert all(g.dtype == np.int32 for g in got)
    want = _hf_ids(tok, texts)
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if list(g) != w]
    assert not bad, f"{len(bad)} documents differ, first: {texts[bad[0]][:80]!r}"
    assert sum(map(len, want)) > 100_000


def _toy_bpe(tmp_path, merges):
    """A byte-level BPE over the 256 byte symbols plus ``merges`` (in rank order), saved for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(tmp_path / "toy"))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tmp_path / "toy"))


def test_unlisted_pair_that_rank_merging_would_join(tmp_path):
    # "bc" is merged before "ab", so HF leaves "abc" as [a, bc]: the pair (a, bc) is not a listed merge and the
    # token "abc" (listed as ab + c) is never emitted. Merging by token rank would join a + bc into "abc".
    tok = _toy_bpe(tmp_path, [("b", "c"), ("a", "b"), ("ab", "c")])
    texts = ["abc", "xabc abcabc", "ab c abd"]
    want = _hf_ids(tok, texts)
    assert want[0] == [tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("bc")]
    import tiktoken

    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"bc": 256, b"ab": 257, b"abc": 258})
    naive = tiktoken.Encoding(name="naive", pat_str=fast_bpe.GPT2_SPLIT, mergeable_ranks=ranks, special_tokens={})
    assert naive.encode_ordinary("abc") == [258]  # the rank rule alone joins a + bc
    assert len(want[0]) == 2
    fast, why = fast_bpe.compile_fast(tok, audit_every=1)
    assert why is None
    assert [list(x) for x in fast(texts)] == want


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda s: s.update(normalizer={"type": "NFC"}), "normalizer"),
        (lambda s: s["pre_tokenizer"].update(add_prefix_space=True), "pre-tokenizer"),
        (lambda s: s["model"].update(dropout=0.1), "dropout"),
    ],
)
def test_declines_what_the_proof_does_not_cover(tmp_path, change, reason):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = _toy_bpe(tmp_path, [("b", "c"), ("a", "b")])
    spec = json.loads(tok.backend_tokenizer.to_str())
    change(spec)
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    fast, why = fast_bpe.compile_fast(other)
    assert fast is None and reason in why


def test_declines_a_token_made_by_two_merges(tmp_path):
    tok = _toy_bpe(tmp_path, [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")])
    fast, why = fast_bpe.compile_fast(tok)
    assert fast is None and "two merges" in why


def test_word_level_tokenizer_keeps_hf(tmp_path):
    from test_data_resume import make_tokenizer
    from transformers import AutoTokenizer

    fast, why = fast_bpe.compile_fast(AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "wl")))
    assert fast is None and "not BPE" in why


def test_audit_raises_on_a_difference(mixed_tokenizer):
    tok, code = mixed_tokenizer
    fast, _ = fast_bpe.compile_fast(tok, audit_every=3)
    fast._id_of_rank = fast._id_of_rank[::-1].copy()  # every id wrong
    fast(["xyz", "qqq"])  # not audited (documents 1 and 2), so no error
    with pytest.raises(fast_bpe.TokenizerMismatch, match="fast_tokenizer=False"):
        fast(["hello there"])


def test_threads_give_the_same_ids(mixed_tokenizer, monkeypatch):
    tok, code = mixed_tokenizer
    fast, _ = fast_bpe.compile_fast(tok, audit_every=0)
    texts = code[:64]
    monkeypatch.setenv("RAYON_NUM_THREADS", "1")
    one = fast(texts)
    monkeypatch.setenv("RAYON_NUM_THREADS", "2")
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    two = fast(texts)
    assert [list(a) for a in one] == [list(b) for b in two] == _hf_ids(tok, texts)


def test_loader_batches_equal_with_and_without_fast_path(tmp_path):
    """0 and 2 DataLoader workers (forked after the parent used the fast path's threads), against HF only."""
    kw = dict(tokenizer="embedded", seq_len=64, batch_size=4, seed=3, cache_dir=str(tmp_path), varlen=True)

    def take(n, **more):
        it = iter(build_loader(**kw, **more))
        return [next(it) for _ in range(n)]

    for workers in (0, 2):
        ref = take(6, num_workers=workers, fast_tokenizer=False)
        got = take(6, num_workers=workers, tokenizer_audit_every=1)
        for a, b in zip(got, ref):
            assert a.keys() == b.keys()
            for k in a:
                assert (a[k] == b[k]).all(), k


def test_long_documents_cut_for_threads_keep_their_ids(mixed_tokenizer, monkeypatch):
    tok, code = mixed_tokenizer
    fast, _ = fast_bpe.compile_fast(tok, audit_every=0)
    long_doc = "\n".join(code[:40]) + "\n" + "\n".join(_mixed_texts(400, seed=5))
    assert len(long_doc) > 4 * fast_bpe._PIECE_CHARS
    pieces = fast._pieces(long_doc)
    assert len(pieces) >= 3 and "".join(pieces) == long_doc
    monkeypatch.setenv("RAYON_NUM_THREADS", "2")
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    texts = [long_doc, "short", long_doc[::-1]]
    assert [list(x) for x in fast(texts)] == _hf_ids(tok, texts)


@pytest.mark.parametrize("workers", [0, 1])
def test_read_ahead_keeps_state_and_resume_exact(tmp_path, monkeypatch, workers):
    """With two encoding threads the stream tokenizes the next read in the background; its saved state is
    still the synchronous one (equal to the HF-only loader's), and a loader restored from it continues with
    exactly the batches of the uninterrupted run."""
    monkeypatch.setenv("RAYON_NUM_THREADS", "2")
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    corpus = tmp_path / "short.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in _mixed_texts(3000, seed=7)))
    kw = dict(
        tokenizer="embedded",
        seq_len=512,
        batch_size=4,
        seed=5,
        cache_dir=str(tmp_path),
        num_workers=workers,
        tokenizer_audit_every=1,
        sources=[str(corpus)],
    )
    whole = iter(build_loader(**kw))
    ref = [next(whole) for _ in range(8)]
    first, sync = build_loader(**kw), build_loader(**kw, fast_tokenizer=False)
    it, it_sync = iter(first), iter(sync)
    states, ahead = [], []
    for _ in range(4):
        next(it), next(it_sync)
        ahead.append(workers == 0 and first._p.live._ahead is not None)
        states.append(first.state_dict())
        assert states[-1] == sync.state_dict()
    assert workers or any(ahead)  # the read-ahead ran (checked in the main process)
    for k, state in enumerate(states, start=1):
        resumed = build_loader(**kw)
        resumed.load_state_dict(json.loads(json.dumps(state)))
        rest = iter(resumed)
        for want in ref[k : k + 3]:
            got = next(rest)
            assert all((got[key] == want[key]).all() for key in want)


def test_many_added_tokens_cut_out_as_hf_does(mixed_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tok, _ = mixed_tokenizer
    tok.save_pretrained(str(tmp_path / "more"))
    more = AutoTokenizer.from_pretrained(str(tmp_path / "more"))
    extra = [f"<|tag{i}|>" for i in range(12)] + ["<|tag1|><|tag2|>"]
    more.add_tokens(extra)
    fast, why = fast_bpe.compile_fast(more, audit_every=0)
    assert why is None
    rng = random.Random(3)
    texts = [
        "".join(rng.choice(extra + ["<s>", " x", "日本", "\n", "<|tag", "|>"]) for _ in range(40)) for _ in range(200)
    ]
    assert [list(x) for x in fast(texts)] == _hf_ids(more, texts)


LLAMA3_STYLE_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


@pytest.mark.parametrize("ignore_merges", [False, True])
def test_split_then_byte_level_tokenizer(mixed_tokenizer, tmp_path, monkeypatch, ignore_merges):
    """A Llama-3-style pre-tokenizer (Split on its own pattern, then ByteLevel without regex), with and
    without ignore_merges: same ids as HF, and long documents are not cut (the newline rule is GPT-2's)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _, code = mixed_tokenizer
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_STYLE_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        code + _mixed_texts(2000, seed=11),
        trainer=trainers.BpeTrainer(
            vocab_size=1500,
            special_tokens=["<|begin|>", "<|end|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    spec = json.loads(tok.to_str())
    spec["model"]["ignore_merges"] = ignore_merges
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    fast, why = fast_bpe.compile_fast(hf, audit_every=0)
    assert why is None, why
    monkeypatch.setenv("RAYON_NUM_THREADS", "2")
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    long_doc = "x;\n".join(code[:30])
    assert fast._pieces(long_doc) == [long_doc]
    texts = code[30:130] + _mixed_texts(1000, seed=12) + [long_doc, "a<|begin|>b<|end|>\n\n  \r\n 123456 ;\n\n"]
    assert [list(x) for x in fast(texts)] == _hf_ids(hf, texts)


def test_declines_a_split_it_does_not_know(tmp_path):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(_toy_bpe(tmp_path, [("b", "c")]).backend_tokenizer.to_str())
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\s+"}, "behavior": "Removed", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    fast, why = fast_bpe.compile_fast(other)
    assert fast is None and "pre-tokenizer" in why


def test_lone_surrogate_is_a_clear_error(mixed_tokenizer):
    tok, _ = mixed_tokenizer
    fast, _ = fast_bpe.compile_fast(tok, audit_every=0)
    with pytest.raises(TypeError):
        tok.backend_tokenizer.encode("ok \ud800 no")  # HF has no ids for it either
    with pytest.raises(ValueError, match="lone surrogate at character 3"):
        fast(["ok \ud800 no"])
