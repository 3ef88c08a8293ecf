"""Saving and restoring training state: atomic, asynchronous, sharded.

`Checkpointer` owns a checkpoint root (see `layout` for what is on disk). A save copies this rank's shards to
host memory while the caller waits (`last_blocked_seconds`), then writes them in a background thread (when the
host has no room for copies of what already lives there, it writes the tensors themselves before returning).
The step directory appears under its final name only once every rank has written and the primary has merged
the databases, so a crash at any moment leaves the previous checkpoint as the latest one. Collectives of the
checkpoint run on a private gloo group, so a background save never interleaves with the loop's collectives.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import pathlib
import pickle
import shutil
import time

import torch
import torch.distributed as dist

from flame_gin.checkpoint import layout, reader, settings, shards, writer

log = logging.getLogger(__name__)


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank (disk full, I/O error); nothing committed."""


class Checkpointer:
    """Orbax-layout checkpoints of a model, its optimizer and plain state.

    Args:
      directory: checkpoint root (shared by all ranks).
      keep: keep the latest `keep` checkpoints (None: keep all).
      keep_every: also keep every step divisible by this (None: none).
      async_save: write in a background thread (one save in flight).
      process_group: ranks that save (default: all). Construction is
        collective over the default group (a private gloo group is made).
      interval_steps / interval_seconds: `save` without `force` only saves
        when one of them is due (neither given: always).
      compression: None (raw chunks, fastest) or "zstd".
      fallback_to_previous: when the latest checkpoint is damaged (an
        array fails its checksum or is truncated, a file is missing), `restore`
        moves it aside as `<step>.damaged` (never deleted: the files may be
        worth a look) and takes the previous committed one. False: stop with
        the error instead.
    """

    def __init__(
        self,
        *,
        directory: str | os.PathLike,
        keep: int | None = None,
        keep_every: int | None = None,
        async_save: bool = False,
        process_group=None,
        interval_steps: int | None = None,
        interval_seconds: float | None = None,
        compression: str | None = None,
        fallback_to_previous: bool = True,
    ):
        settings.validate(keep=keep, compression=compression)
        self._root = pathlib.Path(directory).absolute()
        self._keep, self._keep_every = keep, keep_every
        self._interval_steps, self._interval_seconds = interval_steps, interval_seconds
        self._compression = compression
        self._fallback = fallback_to_previous
        # Two private gloo groups: one for the background writer, one for
        # decisions taken on the caller's thread while a save is in flight.
        self._group = self._sync_group = None
        if dist.is_available() and dist.is_initialized():
            ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
            self._group = dist.new_group(ranks=ranks, backend="gloo")
            self._sync_group = dist.new_group(ranks=ranks, backend="gloo")
        self._rank = 0 if self._group is None else dist.get_rank(self._group)
        self._world = 1 if self._group is None else dist.get_world_size(self._group)
        self._primary = self._rank == 0
        if self._primary:
            self._root.mkdir(parents=True, exist_ok=True)
            for stale in self._root.glob(f"*{layout.TMP_SUFFIX}"):
                shutil.rmtree(stale, ignore_errors=True)
        self._barrier()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt") if async_save else None
        self._pending: concurrent.futures.Future | None = None
        self._last_save_time = time.monotonic()
        self.last_blocked_seconds = 0.0
        self.last_save_seconds = 0.0
        self.last_saved_bytes = 0
        self.restored_extras: list[dict] = []
        # Host copies reused from one save to the next (one save in flight).
        self._buffers: dict[str, dict] = {layout.MODEL_ITEM: {}, layout.OPTIMIZER_ITEM: {}}
        self._told_sync = False

    @property
    def directory(self) -> pathlib.Path:
        return self._root

    # ---- collectives on the private group -------------------------------
    def _barrier(self) -> None:
        if self._group is not None:
            dist.barrier(group=self._group)

    def _all_gather(self, value) -> list:
        if self._group is None:
            return [value]
        out = [None] * self._world
        dist.all_gather_object(out, value, group=self._group)
        return out

    def _broadcast(self, value, *, caller_thread: bool = False):
        group = self._sync_group if caller_thread else self._group
        if group is None:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        return box[0]

    # ---- queries ---------------------------------------------------------
    def latest_step(self) -> int | None:
        """Newest committed step, or None (uncommitted saves are ignored)."""
        steps = layout.committed_steps(self._root)
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Every committed step, oldest first."""
        return layout.committed_steps(self._root)

    def should_save(self, *, step: int) -> bool:
        """True when the step or time interval is due (same on all ranks)."""
        due = self._interval_steps is None and self._interval_seconds is None
        if self._interval_steps and step % self._interval_steps == 0:
            due = True
        if self._interval_seconds is not None:
            elapsed = time.monotonic() - self._last_save_time
            due = due or self._broadcast(elapsed >= self._interval_seconds, caller_thread=True)
        return due

    # ---- save ------------------------------------------------------------
    def save(
        self,
        *,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        extra: dict,
        config_text: str,
        force: bool = False,
    ) -> bool:
        """Save `step` (returns False if not due or already committed).

        `extra` is this rank's plain Python state (scheduler, train state,
        data-loader state, RNG states); the values of all ranks are stored
        and `restore` gives each rank its own back. Collective over ranks.
        """
        if not force and not self.should_save(step=step):
            return False
        start = time.monotonic()
        self.wait()
        if self._broadcast(layout.is_committed(layout.step_dir(root=self._root, step=step))):
            log.info("checkpoint step %d already committed; not saved again", step)
            return False
        init_ns = time.time_ns()
        from torch.distributed.checkpoint import state_dict as dcp_state  # ~1 s: imported at the first save

        parts = {layout.MODEL_ITEM: dcp_state.get_model_state_dict(model)}
        opt_other = None
        if optimizer is not None:
            parts[layout.OPTIMIZER_ITEM], opt_other = shards.flatten_optimizer(
                dcp_state.get_optimizer_state_dict(model, optimizer)
            )
        copy = self._pool is not None and self._copies_fit(parts)
        snaps = {name: writer.snapshot(tensors=t, copy=copy, buffers=self._buffers[name]) for name, t in parts.items()}
        model_snap, opt_snap = snaps[layout.MODEL_ITEM], snaps.get(layout.OPTIMIZER_ITEM)
        # Every rank's extra and the arrays it knows: with pipeline stages, no rank
        # holds every array, and `_METADATA` must still list the whole tree.
        gathered = self._all_gather(
            (
                extra,
                {k: {a.name: (list(a.global_shape), list(a.chunks)) for a in v} for k, v in snaps.items()},
            )
        )
        extras = [g[0] for g in gathered]
        item_shapes = {k: {n: sh for g in gathered for n, sh in g[1][k].items()} for k in snaps}
        side = None
        if self._primary:
            side = dict(
                extras=extras,
                optimizer=opt_other,
                world_size=self._world,
                step=step,
                config_text=config_text,
                model_config=writer.model_config(model),
                item_shapes=item_shapes,
            )
        job = lambda: self._write(  # noqa: E731
            step=step, model_snap=model_snap, opt_snap=opt_snap, side=side, init_ns=init_ns
        )
        self._last_save_time = time.monotonic()
        if not copy:  # the arrays are the live tensors: written before training goes on
            job()
        else:
            self._pending = self._pool.submit(job)
        self.last_blocked_seconds = time.monotonic() - start
        return True

    def _copies_fit(self, parts: dict[str, dict]) -> bool:
        """Whether an asynchronous save's host copies of host-resident tensors fit the host's available memory
        (with a fifth of it left for the writer and the page cache), counted once per rank of the node. Under
        FSDP's CPU offload, parameters and AdamW states already fill most of the host; a copy of them would end
        the run in the kernel's out-of-memory kill at its first save. When they do not fit on any rank, every
        rank writes this save from the live tensors instead, while training waits."""
        need = sum(writer.host_copy_bytes(tensors=t, buffers=self._buffers[name]) for name, t in parts.items())
        room = writer.host_room() * 0.8 / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if all(self._all_gather(need <= room)):
            return True
        if not self._told_sync:
            log.warning(
                "checkpoint: this rank's asynchronous save would copy %.1f GiB of tensors kept on the host, more "
                "than the %.1f GiB it can take; saves are written synchronously (training waits for each write)",
                need / 2**30,
                room / 2**30,
            )
            self._told_sync = True
        return False

    def _write(self, *, step, model_snap, opt_snap, side, init_ns) -> None:
        start = time.monotonic()
        tmp = layout.tmp_step_dir(root=self._root, step=step)
        items = {layout.MODEL_ITEM: model_snap}
        if opt_snap is not None:
            items[layout.OPTIMIZER_ITEM] = opt_snap
        if self._primary:
            shutil.rmtree(tmp, ignore_errors=True)
            for name in items:
                (tmp / name).mkdir(parents=True)
        self._barrier()
        error, nbytes = None, 0
        try:
            for name, snap in items.items():
                nbytes += writer.write_process_db(
                    item_dir=tmp / name,
                    rank=self._rank,
                    arrays=snap,
                    primary=self._primary,
                    compression=self._compression,
                )
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error = f"rank {self._rank}: {type(e).__name__}: {e}"
        errors = [e for e in self._all_gather(error) if e]
        if not errors and self._primary:
            try:
                self._commit(tmp=tmp, step=step, items=items, side=side, init_ns=init_ns)
            except Exception as e:  # noqa: BLE001
                errors = [f"rank 0 (commit): {type(e).__name__}: {e}"]
        errors = self._broadcast(errors)
        if errors:
            if self._primary:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointSaveError(
                f"saving step {step} to {self._root} failed, nothing committed "
                f"(disk full or I/O error?): {'; '.join(errors)}"
            )
        self.last_saved_bytes = sum(self._all_gather(nbytes))
        self.last_save_seconds = time.monotonic() - start

    def _commit(self, *, tmp, step, items, side, init_ns) -> None:
        for name, snap in items.items():
            writer.merge_item(item_dir=tmp / name)
            writer.write_item_metadata(item_dir=tmp / name, arrays=side["item_shapes"][name], init_ns=init_ns)
        layout.write_bytes(path=tmp / layout.EXTRA_FILE, data=pickle.dumps(side))
        layout.write_bytes(path=tmp / layout.CONFIG_FILE, data=side["config_text"].encode())
        if side["model_config"] is not None:
            layout.write_json(path=tmp / layout.MODEL_CONFIG_FILE, value=side["model_config"])
        layout.write_json(
            path=tmp / layout.CHECKPOINT_METADATA,
            value=layout.checkpoint_metadata(
                init_ns=init_ns,
                item_handlers={n: layout.PYTREE_HANDLER for n in items},
            ),
        )
        layout.write_bytes(path=tmp / layout.COMMIT_MARKER, data=f"step {step}\n".encode())
        layout.fsync_dir(tmp)
        os.rename(tmp, layout.step_dir(root=self._root, step=step))
        layout.fsync_dir(self._root)
        self._apply_retention()

    def _apply_retention(self) -> None:
        steps = layout.committed_steps(self._root)
        if self._keep is None:
            return
        keep = set(steps[-self._keep :])
        if self._keep_every:
            keep |= {s for s in steps if s % self._keep_every == 0}
        for s in steps:
            if s not in keep:
                shutil.rmtree(layout.step_dir(root=self._root, step=s), ignore_errors=True)

    def wait(self) -> None:
        """Finish the save in flight; re-raise its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Finish the save in flight and stop the background thread."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    # ---- restore ---------------------------------------------------------
    def restore(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        step: int | None = None,
    ) -> dict:
        """Load a checkpoint into `model` (and `optimizer`); returns `extra`.

        `step=None` takes the latest committed step. `optimizer=None` loads
        the weights only. Tensors keep their sharding: each rank reads just
        its boxes. The returned dict is this rank's saved `extra` (rank 0's
        when the number of ranks changed); `restored_extras` holds all ranks'.
        """
        self.wait()
        steps = self._broadcast(layout.committed_steps(self._root))
        if step is not None:
            if step not in steps:
                raise reader.CheckpointError(
                    f"no committed checkpoint for step {step} in {self._root} (committed: {steps})"
                )
            candidates = [step]
        else:
            candidates = list(reversed(steps)) if self._fallback else steps[-1:]
        if not candidates:
            raise reader.CheckpointError(f"no committed checkpoint in {self._root}")
        for i, s in enumerate(candidates):
            error = None
            try:
                extra = self._restore_step(step=s, model=model, optimizer=optimizer)
            except reader.CheckpointCorruptError as e:
                error = e
            errors = [e for e in self._all_gather(None if error is None else str(error)) if e]
            if not errors:
                return extra
            if i + 1 == len(candidates):  # the oldest stays in place for a look
                hint = (
                    f" (no older committed checkpoint to fall back to; move {self._root / str(s)} "
                    "away to start from scratch)"
                    if step is None and self._fallback
                    else ""
                    if step is not None
                    else " (fallback_to_previous=True would try older checkpoints)"
                )
                raise reader.CheckpointCorruptError(f"{'; '.join(errors)}{hint}")
            moved = self._move_aside(step=s, reason=errors[0])
            log.warning(
                "checkpoint step %d is damaged (%s); moved to %s; resuming from step %d",
                s,
                errors[0],
                moved.name,
                candidates[i + 1],
            )
        raise AssertionError("unreachable")

    def _move_aside(self, *, step: int, reason: str) -> pathlib.Path:
        """Rename a damaged step so it is neither resumed nor counted again.

        The new name is not an integer, so retention never deletes it and a
        later save of the same step is written afresh; `DAMAGED.txt` inside
        says why.
        """
        src = layout.step_dir(root=self._root, step=step)
        dst = layout.damaged_dir(root=self._root, step=step)
        if self._primary:
            os.rename(src, dst)
            (dst / "DAMAGED.txt").write_text(f"{reason}\n")
            layout.fsync_dir(self._root)
        self._barrier()
        return dst

    def _restore_step(self, *, step, model, optimizer) -> dict:
        path = layout.step_dir(root=self._root, step=step)
        self.restored_extras = reader.read_step(path=path, step=step, model=model, optimizer=optimizer)
        same = len(self.restored_extras) == self._world
        return self.restored_extras[self._rank if same else 0]
