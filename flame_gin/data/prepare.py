"""``python -m flame_gin.data.prepare``: tokenize a run's data into token stores before training, on every core.

Two modes:

  # The stores a run's offline mode reads, built with 16 tokenizer processes (same gin files as the run):
  python -m flame_gin.data.prepare --gin_file=gin/gla.gin --gin_file=gin/data/offline.gin --processes=16

  # A store from tokens prepared by another tool (a flat .bin of uint16/uint32 ids):
  python -m flame_gin.data.prepare --ingest_tokens=train.bin --dtype=uint16 --separator=2 --out=/data/corpus/train

The first builds, for the training data and (when bound) the evaluation data, exactly the stores that
``flame_gin.build_loader(offline=True)`` would build at the start of the run, under the same keys, so the run
then finds them and starts reading at once; an interrupted build resumes where it stopped. The second writes a
store that a source names by its folder: ``flame_gin.build_loader.sources = [{'path': '/data/corpus'}]`` reads
``/data/corpus/train`` for training and ``/data/corpus/validation`` for evaluation. The on-disk format is in
``flame_gin.data.store``. The last line printed is one JSON object: each store's folder, documents, tokens and
the build's tokens per second.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from absl import flags

_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "Gin files of the run whose data to prepare.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Extra gin bindings (or --gin.NAME=VALUE).")
_PROCESSES = flags.DEFINE_integer("processes", 1, "Tokenizer processes (every core of the node: os.cpu_count()).")
_INGEST = flags.DEFINE_string("ingest_tokens", None, "A flat token array file to ingest instead of tokenizing.")
_DTYPE = flags.DEFINE_enum("dtype", "uint16", ["uint16", "uint32", "int32"], "The ingested file's value type.")
_SEPARATOR = flags.DEFINE_integer("separator", None, "Ingest: the token that ends every document (an EOS id).")
_OFFSETS = flags.DEFINE_string("offsets", None, "Ingest: a .npy of int64 document boundaries, 0 ... token count.")
_OUT = flags.DEFINE_string("out", None, "Ingest: the store folder to create (for example /data/corpus/train).")


def _prepare_run_data(*, gin_files: list[str], bindings: list[str], processes: int) -> list[dict]:
    """Builds the run's stores by building its loaders once, offline, with ``processes`` tokenizers."""
    from flame_gin import config as config_lib
    from flame_gin import configurables  # noqa: F401  (registers the configurables)

    config_lib.parse(
        gin_files=gin_files,
        gin_bindings=[*bindings, "MODEL_DIR = '/unused-by-prepare'"],
        search_paths=config_lib.default_search_paths(),
    )
    value = config_lib.bound_value
    out = []
    for split, name in (("train", "flame_gin.run.train_data"), ("validation", "flame_gin.evaluation.data")):
        factory = value(name, None)
        if factory is None:
            continue
        started = time.perf_counter()
        loader = factory.scoped_configurable_fn(  # the configured reference, called as the trainer would
            seq_len=value("flame_gin.run.seq_len"),
            batch_size=1,
            rank=0,
            world_size=1,
            seed=value("flame_gin.run.seed", 42),
            split=split,
            varlen=False,
            offline=True,
            store_processes=processes,
        )
        seconds = time.perf_counter() - started
        for built in loader.stores():
            out.append({"split": split, **built.describe(), "seconds": round(seconds, 2)})
    return out


def main(argv) -> int:
    del argv
    from flame_gin import quiet

    quiet.install()
    try:
        if _INGEST.value:
            if not _OUT.value:
                raise ValueError("--ingest_tokens needs --out, the store folder to create")
            from flame_gin.data import store_build

            built = store_build.ingest(
                tokens=pathlib.Path(_INGEST.value),
                dtype=_DTYPE.value,
                directory=pathlib.Path(_OUT.value),
                offsets=pathlib.Path(_OFFSETS.value) if _OFFSETS.value else None,
                separator=_SEPARATOR.value,
            )
            stores = [built.describe()]
        else:
            if not _GIN_FILES.value:
                raise ValueError("give the run's --gin_file(s), or --ingest_tokens to ingest a token array")
            if _PROCESSES.value < 1:
                raise ValueError(f"--processes={_PROCESSES.value} must be at least 1")
            stores = _prepare_run_data(
                gin_files=_GIN_FILES.value, bindings=_GIN_BINDINGS.value, processes=_PROCESSES.value
            )
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"flame_gin.data.prepare: {e}", file=sys.stderr)
        return 2
    for s in stores:
        print(f"store {s['directory']}: {s['documents']:,} documents, {s['tokens']:,} tokens", file=sys.stderr)
    print(json.dumps({"prepare": stores}))
    return 0


def run_main() -> None:
    """Console-script entry (the ``--gin.X=V`` shorthand accepted, as in ``flame_gin.train``)."""
    from flame_gin import config as config_lib

    config_lib.run_command(main, prog="flame_gin.data.prepare")


if __name__ == "__main__":
    run_main()
