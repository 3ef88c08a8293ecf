"""Reading Orbax PyTree items into existing torch tensors by region reads.

Each rank reads only the box of each global array that its own tensor
covers, so a checkpoint written at one mesh loads at any other. Works for
items written by flame_gin and by `orbax.checkpoint` from JAX alike.
"""

from __future__ import annotations

import json
import pathlib
import pickle

import torch

from flame_gin import mesh as mesh_lib
from flame_gin.checkpoint import layout, shards


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the target."""


class CheckpointCorruptError(CheckpointError):
    """An array of a committed checkpoint cannot be read back."""


def _driver(item_dir: pathlib.Path) -> str:
    meta = pathlib.Path(item_dir) / layout.TREE_METADATA
    if not meta.is_file():
        raise CheckpointCorruptError(f"{item_dir}: no {layout.TREE_METADATA}; not an Orbax item")
    try:
        use_zarr3 = json.loads(meta.read_text()).get("use_zarr3", False)
    except ValueError as e:
        raise CheckpointCorruptError(f"{meta}: unreadable metadata ({e})") from e
    return "zarr3" if use_zarr3 else "zarr"


def stored_names(*, item_dir: pathlib.Path) -> list[str]:
    """Names of the arrays in an item, from its `_METADATA`."""
    meta = json.loads((pathlib.Path(item_dir) / layout.TREE_METADATA).read_text())
    names = []
    for entry in meta["tree_metadata"].values():
        names.append(".".join(str(k["key"]) for k in entry["key_metadata"]))
    return names


def read_item(*, item_dir: pathlib.Path, tensors: dict[str, torch.Tensor], step: int | None) -> None:
    """Fill `tensors` (plain or DTensor) in place from the item's arrays.

    Raises CheckpointError naming the array when one is missing or has
    another shape, and CheckpointCorruptError naming the array and the step
    when its data cannot be read (truncated or damaged files).
    """
    item_dir = pathlib.Path(item_dir)
    where = f"step {step}" if step is not None else str(item_dir)
    driver = _driver(item_dir)
    kv = layout.ocdbt_kvstore(path=item_dir, for_write=False)
    import tensorstore as ts  # ~1 s with ml_dtypes: imported when a checkpoint is first read

    context = ts.Context()
    try:
        kvstore = ts.KvStore.open(kv, context=context).result()
        present = {k.decode().rsplit("/", 1)[0] for k in kvstore.list().result()}
    except Exception as e:  # tensorstore raises ValueError/RuntimeError
        raise CheckpointCorruptError(f"checkpoint {where}: database in {item_dir} is unreadable: {e}") from e
    missing = [n for n in tensors if n not in present]
    if missing:
        raise CheckpointError(
            f"checkpoint {where} ({item_dir}) lacks arrays {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    opened = {
        name: ts.open(
            {"driver": driver, "kvstore": kv, "path": name, "open": True},
            context=context,
        )
        for name in tensors
    }
    reads = {}
    for name, tensor in tensors.items():
        try:
            store = opened[name].result()
        except Exception as e:
            raise CheckpointCorruptError(f"checkpoint {where}: array {name!r} metadata is unreadable: {e}") from e
        if tuple(store.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint {where}: array {name!r} has shape "
                f"{tuple(store.shape)}, the target has {tuple(tensor.shape)}"
            )
        box = shards.box_of(name=name, tensor=tensor)
        if box.contiguous and box.empty:
            reads[name] = (None, box)
        elif box.contiguous:
            reads[name] = (store[box.slices()].read(), box)
        else:  # nested sharding: read all, then scatter like the target
            reads[name] = (store.read(), box)
    for name, tensor in tensors.items():
        future, box = reads[name]
        if future is None:
            continue
        try:
            value = shards.from_numpy(future.result())
        except Exception as e:
            raise CheckpointCorruptError(
                f"checkpoint {where}: array {name!r} is corrupted or truncated ({item_dir}): {e}"
            ) from e
        assign_box(tensor=tensor, value=value, box=box)


def assign_box(*, tensor: torch.Tensor, value: torch.Tensor, box: shards.Box) -> None:
    """Copy `value` (this rank's box, or the full array if the box is not
    contiguous) into `tensor` (plain or DTensor) in place."""
    if mesh_lib.is_dtensor(tensor):
        from torch.distributed.tensor import distribute_tensor

        if not box.contiguous:
            value = distribute_tensor(value.to(tensor.dtype), tensor.device_mesh, tensor.placements).to_local()
        target = tensor.to_local()
    else:
        target = tensor
    with torch.no_grad():
        target.copy_(value.reshape(target.shape))


def read_step(*, path: pathlib.Path, step: int, model: torch.nn.Module, optimizer) -> list:
    """Loads committed step directory `path` into `model` (and `optimizer`, unless None); returns every rank's
    saved `extra`, in rank order. Raises CheckpointCorruptError for an unreadable side file or array."""
    try:
        side = pickle.loads((path / layout.EXTRA_FILE).read_bytes())
    except Exception as e:  # noqa: BLE001
        raise CheckpointCorruptError(f"checkpoint step {step}: {layout.EXTRA_FILE} is unreadable: {e}") from e
    from torch.distributed.checkpoint import state_dict as dcp_state  # ~1 s: imported at the first restore

    read_item(item_dir=path / layout.MODEL_ITEM, tensors=dcp_state.get_model_state_dict(model), step=step)
    if optimizer is not None:
        if side.get("optimizer") is None:
            raise CheckpointError(f"checkpoint step {step} in {path.parent} holds no optimizer state")
        state = dcp_state.get_optimizer_state_dict(model, optimizer)
        tensors, _ = shards.flatten_optimizer(state)
        read_item(item_dir=path / layout.OPTIMIZER_ITEM, tensors=tensors, step=step)
        for fqn, values in side["optimizer"]["state"].items():
            state["state"].setdefault(fqn, {}).update(values)
        state["param_groups"] = side["optimizer"]["param_groups"]
        dcp_state.set_optimizer_state_dict(model, optimizer, state)
    return side["extras"]
