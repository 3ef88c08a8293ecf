"""Runs a function in N gloo processes on this machine (free port, barrier before teardown).

Worker functions take `(rank, world_size, *args)`; an exception in any worker fails the caller.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, kwargs):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args, **kwargs)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(fn, *, world_size: int, args: tuple = (), kwargs: dict | None = None) -> None:
    """Spawns `world_size` processes running `fn(rank, world_size, *args)`; raises if any fails."""
    mp.start_processes(
        _entry,
        args=(world_size, _free_port(), fn, args, kwargs or {}),
        nprocs=world_size,
        start_method="spawn",
        join=True,
    )
