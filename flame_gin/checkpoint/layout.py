"""The on-disk layout of a checkpoint, in the format `orbax.checkpoint` reads.

Kept in one place so that the writer, the reader, retention and the tests
agree on names. A checkpoint root holds one directory per step:

    <root>/<step>/                      committed (name is the step, marker inside)
        _CHECKPOINT_METADATA            step-level metadata (CheckpointManager style)
        commit_success.txt              commit marker
        model/                          Orbax PyTree item: state_dict name -> array
            _METADATA, _CHECKPOINT_METADATA, _sharding, array_metadatas/,
            manifest.ocdbt, d/,
            ocdbt.process_<rank>/       per-process OCDBT databases, merged
                                        into the item's root database
        optimizer/                      same, for the optimizer state tree
        extra.pkl                       plain Python values of every rank
        config.gin                      resolved gin config text
        model_config.json               the model's HF config, when it has one
    <root>/<step>.orbax-checkpoint-tmp  being written; never read
    <root>/<step>.damaged               failed to restore, moved aside; never read

A directory counts as a checkpoint only if its name is an integer and the
commit marker is present, so a reader never takes a partial save.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import time

TMP_SUFFIX = ".orbax-checkpoint-tmp"
DAMAGED_SUFFIX = ".damaged"
COMMIT_MARKER = "commit_success.txt"
CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
TREE_METADATA = "_METADATA"
MODEL_ITEM = "model"
OPTIMIZER_ITEM = "optimizer"
EXTRA_FILE = "extra.pkl"
CONFIG_FILE = "config.gin"
MODEL_CONFIG_FILE = "model_config.json"
PROCESS_PREFIX = "ocdbt.process_"
SHARDING_FILE = "_sharding"
ARRAY_METADATA_DIR = "array_metadatas"

# Same OCDBT settings Orbax uses when it writes: small values inline, one
# large root node, single-file manifest.
_OCDBT_CONFIG = {
    "max_inline_value_bytes": 1024,
    "max_decoded_node_bytes": 100_000_000,
    "manifest_kind": "single",
}
_TARGET_DATA_FILE_SIZE = 2 * 1024**3


def step_dir(*, root: pathlib.Path, step: int) -> pathlib.Path:
    """Final (committed) directory of `step`."""
    return pathlib.Path(root) / str(int(step))


def tmp_step_dir(*, root: pathlib.Path, step: int) -> pathlib.Path:
    """Directory a save of `step` is written to before the commit rename."""
    return pathlib.Path(root) / f"{int(step)}{TMP_SUFFIX}"


def damaged_dir(*, root: pathlib.Path, step: int) -> pathlib.Path:
    """A free name for step `step` moved aside as damaged: not an integer, so never resumed or pruned."""
    root, n = pathlib.Path(root), 1
    path = root / f"{int(step)}{DAMAGED_SUFFIX}"
    while path.exists():
        n += 1
        path = root / f"{int(step)}{DAMAGED_SUFFIX}{n}"
    return path


def is_committed(path: pathlib.Path) -> bool:
    """True for a finished checkpoint: integer name and commit marker."""
    path = pathlib.Path(path)
    return path.name.isdigit() and (path / COMMIT_MARKER).is_file()


def committed_steps(root: pathlib.Path) -> list[int]:
    """Sorted steps of the committed checkpoints under `root`."""
    root = pathlib.Path(root)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if is_committed(p))


def ocdbt_kvstore(*, path: pathlib.Path, for_write: bool) -> dict:
    """Tensorstore kvstore spec for the OCDBT database rooted at `path`."""
    base = {"driver": "file", "path": f"{os.path.abspath(path)}/"}
    spec = {"driver": "ocdbt", "base": base}
    if for_write:
        # Data files are written once under fresh names, so they need no
        # lock; the manifest keeps atomic replacement.
        spec["base"] = dict(base, file_io_locking={"mode": "non_atomic"})
        spec["manifest"] = base
        spec.update(
            config=dict(_OCDBT_CONFIG),
            target_data_file_size=_TARGET_DATA_FILE_SIZE,
            assume_config=True,
        )
    return spec


def process_dir(*, item_dir: pathlib.Path, rank: int) -> pathlib.Path:
    """Per-process OCDBT database of `rank` inside an item directory."""
    return pathlib.Path(item_dir) / f"{PROCESS_PREFIX}{rank}"


def zarr_spec(*, kvstore: dict, name: str) -> dict:
    """Tensorstore spec of the zarr (v3) array stored under key `name`."""
    return {"driver": "zarr3", "kvstore": kvstore, "path": name}


def tree_metadata(*, shapes: dict[str, list[int]]) -> dict:
    """Orbax `_METADATA` content for a flat tree {name: array}.

    Names are state_dict keys; Orbax joins a tree path with '.', so a flat
    tree keyed by state_dict names gives the same storage keys as the nested
    tree a JAX user would build.
    """
    tree = {}
    for name, shape in shapes.items():
        tree[str((name,))] = {
            "key_metadata": [{"key": name, "key_type": 2}],
            "value_metadata": {
                "value_type": "jax.Array",
                "skip_deserialize": False,
                "write_shape": list(shape),
            },
        }
    return {
        "tree_metadata": tree,
        "use_ocdbt": True,
        "use_zarr3": True,
        "store_array_data_equal_to_fill_value": True,
        "custom_metadata": None,
    }


def sharding_metadata(*, names: list[str]) -> dict:
    """Orbax `_sharding` content: each array whole on JAX device 0.

    A torch checkpoint has no JAX sharding to record. Orbax restores an
    array without a target onto the sharding named here, so this names the
    one placement every JAX process can build whatever its platform (CPU,
    GPU or TPU): a one-device mesh over device id 0, array replicated. Orbax
    keys the entries by the URL-safe base64 of the array's name.
    """
    sharding = json.dumps(
        {
            "sharding_type": "NamedSharding",
            "shape": [1],
            "axis_names": ["replica"],
            "partition_spec": [],
            "device_mesh": {"mesh": [{"id": 0}]},
        }
    )
    return {base64.urlsafe_b64encode(n.encode()).decode(): sharding for n in names}


def array_metadatas(*, chunks: dict[str, list[int]]) -> dict:
    """Orbax `array_metadatas/process_0` content (write and chunk shapes)."""
    return {
        "array_metadatas": [
            {
                "array_metadata": {
                    "param_name": name,
                    "write_shape": list(shape),
                    "chunk_shape": list(shape),
                    "ext_metadata": None,
                }
            }
            for name, shape in chunks.items()
        ]
    }


def checkpoint_metadata(*, init_ns: int, item_handlers) -> dict:
    """Orbax `_CHECKPOINT_METADATA` content."""
    return {
        "item_handlers": item_handlers,
        "metrics": {},
        "performance_metrics": {},
        "init_timestamp_nsecs": init_ns,
        "commit_timestamp_nsecs": time.time_ns(),
        "custom_metadata": {},
    }


PYTREE_HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"


def write_json(*, path: pathlib.Path, value) -> None:
    """Write JSON durably (flush + fsync) so a commit never precedes it."""
    write_bytes(path=path, data=json.dumps(value).encode())


def write_bytes(*, path: pathlib.Path, data: bytes) -> None:
    """Write bytes durably (flush + fsync)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: pathlib.Path) -> None:
    """fsync a directory so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
