"""Writing one Orbax PyTree item from torch tensors with tensorstore alone.

The save is split in two so that an asynchronous save blocks the training
loop only for the first part:

1. `snapshot` (caller's thread): copy this rank's boxes to host memory and
   take any collectives needed; afterwards training may change the tensors.
2. `write_process_db` (any thread): write the copies into this rank's own
   OCDBT database; then, once every rank is done, `merge_item` (primary
   only) merges the per-process databases into the item's root database and
   `write_item_metadata` writes `_METADATA` so Orbax can restore it.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import torch
import torch.distributed as dist

from flame_gin import mesh as mesh_lib
from flame_gin.checkpoint import layout, shards

# zarr v3 bytes-to-bytes codecs per compression setting.
COMPRESSORS = {None: [], "zstd": [{"name": "zstd", "configuration": {"level": 1}}]}


@dataclasses.dataclass
class ArraySnapshot:
    """Host copy of the part of one array this rank writes (or None)."""

    name: str
    global_shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str
    offset: tuple[int, ...]
    data: np.ndarray | None


def snapshot(*, tensors: dict[str, torch.Tensor], copy: bool, buffers: dict | None = None) -> list[ArraySnapshot]:
    """Take what this rank must write as host arrays (may run collectives).

    With `copy`, CPU tensors are copied so that training may go on changing
    them (asynchronous save); without, they are viewed in place (a
    synchronous save writes before returning). Device tensors are always
    copied to host. `buffers` (name -> host tensor) keeps the host copies
    between saves, so later saves skip allocation (pinned for GPU tensors);
    only valid while no earlier save still reads them. Every rank must call
    it with the same names in the same order.
    """
    out, on_device = [], False
    for name, tensor in tensors.items():
        dtype = shards.zarr_dtype(name=name, dtype=tensor.dtype)
        box = shards.box_of(name=name, tensor=tensor)
        if box.contiguous:
            chunks = shards.shard_chunks(tensor=tensor)
            write = shards.is_writer(tensor=tensor) and not box.empty
            local = mesh_lib.local_tensor(tensor) if write else None
            offset = box.offset
        else:  # nested sharding of one dim: gather, first rank writes it all
            full = tensor.full_tensor()
            chunks = shards.shard_chunks(tensor=full)
            write = dist.get_rank() == 0
            local, offset = (full if write else None), (0,) * full.dim()
        data = None
        if local is not None:
            local = local.detach()
            if copy or local.device.type != "cpu":
                on_device |= local.device.type != "cpu"
                local = _host_copy(name=name, tensor=local, buffers=buffers)
            data = shards.to_numpy(local)
        out.append(
            ArraySnapshot(
                name=name,
                global_shape=box.global_shape,
                chunks=chunks,
                dtype=dtype,
                offset=offset,
                data=data,
            )
        )
    if on_device and torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking copies must have landed
    return out


def host_room() -> int:
    """Bytes of host memory free for new copies: psutil's available memory. Swap is not counted (unlike the
    start-up check of offloaded states): a save copied into swap would be slower than writing the live
    tensors while training waits."""
    import psutil

    return psutil.virtual_memory().available


def host_copy_bytes(*, tensors: dict[str, torch.Tensor], buffers: dict | None) -> int:
    """Bytes that ``snapshot(copy=True)`` would newly take on the host for tensors that already live there:
    every tensor of a CPU run, the parameters and optimizer states that FSDP's CPU offload keeps on the host.
    Buffers kept from an earlier save are reused and not counted. A GPU tensor is left out: its host copy is
    the only way to write it at all."""
    total = 0
    for name, tensor in tensors.items():
        local = mesh_lib.local_tensor(tensor)
        if local.device.type == "cpu" and _reusable(name=name, tensor=local, buffers=buffers) is None:
            total += local.numel() * local.element_size()
    return total


def _reusable(*, name: str, tensor: torch.Tensor, buffers: dict | None) -> torch.Tensor | None:
    """The host buffer an earlier save kept for ``name``, when it can hold ``tensor`` again."""
    buf = None if buffers is None else buffers.get(name)
    return buf if buf is not None and buf.shape == tensor.shape and buf.dtype == tensor.dtype else None


def _host_copy(*, name: str, tensor: torch.Tensor, buffers: dict | None) -> torch.Tensor:
    buf = _reusable(name=name, tensor=tensor, buffers=buffers)
    if buf is None:
        pin = tensor.device.type == "cuda"
        buf = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
        if buffers is not None:
            buffers[name] = buf
    buf.copy_(tensor, non_blocking=tensor.device.type == "cuda")
    return buf


def _array_spec(*, kvstore: dict, snap: ArraySnapshot, compression) -> dict:
    """A zarr v3 array whose every chunk ends in a CRC32C of its bytes.

    Tensorstore checks the checksum on every read, so a bit flip in a saved
    array fails the restore (which then falls back to an older checkpoint)
    instead of loading silently wrong weights. Orbax reads these arrays too.
    """
    spec = layout.zarr_spec(kvstore=kvstore, name=snap.name)
    spec.update(
        metadata={
            "shape": list(snap.global_shape),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(snap.chunks)}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
            "data_type": snap.dtype,
            "codecs": [
                {"name": "bytes", "configuration": {"endian": "little"}},
                *COMPRESSORS[compression],
                {"name": "crc32c"},
            ],
            "fill_value": False if snap.dtype == "bool" else 0,
        },
        # All-zero chunks (fresh Adam moments) must be stored too, or a
        # reader that expects every chunk fails.
        store_data_equal_to_fill_value=True,
        create=True,
        open=True,
    )
    return spec


def write_process_db(
    *,
    item_dir: pathlib.Path,
    rank: int,
    arrays: list[ArraySnapshot],
    primary: bool,
    compression: str | None,
) -> int:
    """Write this rank's boxes into its OCDBT database; returns bytes written.

    The primary also creates the metadata of every array, so arrays that it
    holds no data for still exist in the merged database.
    """
    if compression not in COMPRESSORS:
        raise ValueError(f"compression={compression!r}: use one of {list(COMPRESSORS)}")
    kv = layout.ocdbt_kvstore(path=layout.process_dir(item_dir=item_dir, rank=rank), for_write=True)
    import tensorstore as ts  # ~1 s with ml_dtypes: imported when a checkpoint is first written

    context = ts.Context()
    # One transaction: a single OCDBT commit (few data files, one manifest
    # write) instead of one per array.
    txn = ts.Transaction()
    todo = [a for a in arrays if primary or a.data is not None]
    opened = [
        ts.open(
            _array_spec(kvstore=kv, snap=a, compression=compression),
            context=context,
            transaction=txn,
        )
        for a in todo
    ]
    writes, nbytes = [], 0
    for snap, fut in zip(todo, opened):
        store = fut.result()
        if snap.data is None:
            continue
        region = tuple(slice(o, o + n) for o, n in zip(snap.offset, snap.data.shape))
        writes.append(store[region].write(snap.data))
        nbytes += snap.data.nbytes
    for w in writes:
        w.result()
    txn.commit_async().result()
    return nbytes


def merge_item(*, item_dir: pathlib.Path) -> None:
    """Merge every per-process database into the item's root database.

    Keys are copied by reference (data files stay in the process folders).
    The chunk grid is the shard grid, so no key is written by two ranks,
    except the identical array metadata.
    """
    # Parent and children must share one context: copying by reference
    # works only between OCDBT databases over the same base kvstore.
    import tensorstore as ts

    context = ts.Context()
    parent = ts.KvStore.open(layout.ocdbt_kvstore(path=item_dir, for_write=True), context=context).result()
    txn = ts.Transaction(atomic=True)
    children = sorted(pathlib.Path(item_dir).glob(f"{layout.PROCESS_PREFIX}*"))
    for child_dir in children:
        child = ts.KvStore.open(layout.ocdbt_kvstore(path=child_dir, for_write=True), context=context).result()
        child.experimental_copy_range_to(parent.with_transaction(txn)).result()
    txn.commit_async().result()


def write_item_metadata(
    *, item_dir: pathlib.Path, arrays: dict[str, tuple[list[int], list[int]]], init_ns: int
) -> None:
    """Orbax's metadata files for the item.

    `arrays` maps every array of every rank to (global shape, chunk shape).
    Besides `_METADATA` and `_CHECKPOINT_METADATA`, the item gets what Orbax
    writes for its own checkpoints (`_sharding`, `array_metadatas/`), so that
    restore calls that take no target (`PyTreeCheckpointer().restore(path)`)
    work too and give `jax.Array`s.
    """
    item_dir = pathlib.Path(item_dir)
    layout.write_json(
        path=item_dir / layout.TREE_METADATA,
        value=layout.tree_metadata(shapes={n: shape for n, (shape, _) in arrays.items()}),
    )
    layout.write_json(path=item_dir / layout.SHARDING_FILE, value=layout.sharding_metadata(names=list(arrays)))
    (item_dir / layout.ARRAY_METADATA_DIR).mkdir(exist_ok=True)
    layout.write_json(
        path=item_dir / layout.ARRAY_METADATA_DIR / "process_0",
        value=layout.array_metadatas(chunks={n: chunks for n, (_, chunks) in arrays.items()}),
    )
    layout.write_json(
        path=pathlib.Path(item_dir) / layout.CHECKPOINT_METADATA,
        value=layout.checkpoint_metadata(init_ns=init_ns, item_handlers=layout.PYTREE_HANDLER),
    )


def model_config(model: torch.nn.Module) -> dict | None:
    """The model's HF config as a dict (for export), when it has one."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return None
    value = json.loads(config.to_json_string())
    value.setdefault("architectures", [type(model).__name__])
    return value
