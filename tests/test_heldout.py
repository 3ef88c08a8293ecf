"""Evaluation reads held-out data: a source's hold-out share is disjoint from what training reads (and the two
cover the corpus), every shipped data config evaluates on documents training never sees, a config that would
evaluate on training documents is refused, and the evaluation code gives the training loss when it is handed
the training batch."""

import functools
import pathlib

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator
from test_data_resume import ID_BASE, doc_text, make_tokenizer, write_corpus

import gin
from flame_gin import config as config_lib
from flame_gin import loop, models, steps
from flame_gin import loss as loss_lib
from flame_gin.data import build_loader, loader, source, sources
from flame_gin.data.plan import _as_source

ROOT = pathlib.Path(__file__).resolve().parents[1]
N = 240  # the test tokenizer has one marker token per document for 240 documents


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("heldout")
    return {
        "tok": make_tokenizer(d / "tok"),
        "path": write_corpus(str(d), "c.jsonl", range(N)),
        "cache": str(d / "cache"),
    }


def _doc_ids(loader) -> set[int]:
    ids = set()
    for batch in loader:
        ids.update(int(t) - ID_BASE for t in batch["input_ids"].flatten() if ID_BASE <= int(t) < ID_BASE + N)
    return ids


@pytest.mark.parametrize("streaming", [False, True])
def test_holdout_is_disjoint_from_training_and_both_cover_the_corpus(corpus, streaming):
    spec = {"path": corpus["path"], "holdout": 0.2, "streaming": streaming}
    read = functools.partial(
        build_loader,
        sources=[spec],
        seq_len=32,
        batch_size=2,
        seed=0,
        tokenizer=corpus["tok"],
        cache_dir=corpus["cache"],
        shuffle=False,
        num_epochs=1,
    )
    train, held = _doc_ids(read(split="train")), _doc_ids(read(split="validation"))
    want = {i for i in range(N) if sources.held_out(doc_text(i), share=0.2)}
    assert held == want and 0.1 * N < len(held) < 0.3 * N
    assert not train & held and train | held == set(range(N))


class _Counted:
    """A loader that counts how often it is read from its start."""

    def __init__(self, inner):
        self.inner, self.reads = inner, 0

    def __iter__(self):
        self.reads += 1
        return iter(self.inner)


@pytest.mark.parametrize("streaming", [False, True])
def test_the_held_out_batches_are_read_once_and_are_what_a_fresh_read_gives(corpus, streaming):
    read = functools.partial(
        build_loader,
        sources=[{"path": corpus["path"], "holdout": 0.2, "streaming": streaming}],
        seq_len=32,
        batch_size=2,
        seed=0,
        tokenizer=corpus["tok"],
        cache_dir=corpus["cache"],
        split="validation",
    )
    fresh = [b["input_ids"] for b, _ in zip(read(), range(3))]
    counted = _Counted(read())
    kept = loop.HeldOutBatches(loader=counted, max_batches=3)
    first, second = [b["input_ids"] for b in kept], [b["input_ids"] for b in kept]
    assert counted.reads == 1 and len(first) == len(second) == 3
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(first, second, fresh))
    counted = _Counted(read(num_epochs=1))  # fewer batches than asked for: all of them are kept
    kept = loop.HeldOutBatches(loader=counted, max_batches=10**6)
    assert len(list(kept)) == len(list(kept)) == len(list(read(num_epochs=1))) > 3 and counted.reads == 1


def test_evaluating_on_training_documents_is_refused(corpus):
    with pytest.raises(ValueError, match=r"evaluation would read the training documents .*same data_files.*holdout"):
        source(path="json", data_files={"train": corpus["path"], "validation": corpus["path"]})
    with pytest.raises(ValueError, match=r"validation_split='train'"):
        source(path="some/hub-dataset", validation_split="train")
    with pytest.raises(ValueError, match=r"holdout=1.5 must lie in \[0, 1\)"):
        source(path="some/hub-dataset", holdout=1.5)


DATA_MACROS = [
    "DATA_TRAIN = 'train.jsonl'",
    "DATA_VALID = 'valid.jsonl'",
    "DATA_A = 'a.jsonl'",
    "DATA_B = 'b.jsonl'",
    "TOKENIZER = 'tok'",
]


def _resolve(value):
    """Macros inside a bound literal resolved, as gin resolves them when it calls the configurable."""
    if isinstance(value, gin.config.ConfigurableReference):
        return _resolve(value.scoped_configurable_fn())
    if isinstance(value, dict):
        return {k: _resolve(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(v) for v in value)
    return value


@pytest.mark.parametrize("path", sorted((ROOT / "gin" / "data").glob("*.gin")), ids=lambda p: p.stem)
def test_every_shipped_data_config_evaluates_on_held_out_documents(path):
    gin.clear_config()
    gin.add_config_file_search_path(str(ROOT / "gin"))
    gin.parse_config_files_and_bindings([str(path)], DATA_MACROS, skip_unknown=True)
    specs = _resolve(config_lib.bound_value("flame_gin.build_loader.sources", None))
    gin.clear_config()
    for spec in specs or []:  # files that bind no sources keep the experiment's (embedded: its own validation file)
        src = _as_source(spec)
        assert src.holdout > 0 or sources.split_name(src, "validation") != sources.split_name(src, "train")


@pytest.mark.slow
def test_evaluation_of_the_training_batch_gives_the_training_loss(tmp_path, train_tiny):
    """The step-1 training loss (logged by the trainer) equals flame_gin's evaluation of the initial model on the
    first training batch: the evaluation path computes the same loss as training, so a held-out figure is
    comparable to the training curve."""
    train_tiny(tmp_path, steps=1, bindings=("flame_gin.run.log_interval = 1", "flame_gin.run.checkpointer = None"))
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    (logged,) = [e.value for e in acc.Scalars("loss")]
    value = config_lib.bound_value
    seed = value("flame_gin.run.seed")
    loader = gin.query_parameter("flame_gin.run.train_data").scoped_configurable_fn(
        seq_len=value("flame_gin.run.seq_len"),
        batch_size=value("flame_gin.run.batch_size"),
        rank=0,
        world_size=1,
        seed=seed,
        split="train",
        varlen=False,
    )
    config = gin.query_parameter("flame_gin.run.model_config").scoped_configurable_fn()
    model = models.build_model(config=config, device="cpu", seed=seed)
    first = next(iter(loader))
    result = steps.evaluate(
        model=model,
        loader=[first],
        device=torch.device("cpu"),
        max_batches=1,
        loss_fn=functools.partial(loss_lib.loss_sum, fused=False),
    )
    assert result["eval_loss"] == pytest.approx(logged, rel=1e-6)


@pytest.mark.slow
def test_a_run_reads_its_held_out_batches_at_the_first_evaluation_only(tmp_path, monkeypatch, train_tiny):
    """Three evaluations of a model that changes: three different held-out losses from one read of the
    validation data."""
    reads = []
    original = loader.Loader.__iter__

    def counted(self):
        reads.append(self._restart_each_iter)  # True for the validation loader
        return original(self)

    monkeypatch.setattr(loader.Loader, "__iter__", counted)
    bindings = ("flame_gin.evaluation.interval = 1", "flame_gin.evaluation.batches = 2")
    train_tiny(tmp_path, steps=3, bindings=(*bindings, "flame_gin.run.checkpointer = None"))
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("eval_loss")]
    assert len(set(losses)) == 3 and reads.count(True) == 1
