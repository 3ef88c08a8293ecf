"""Process-level set-up: the process group, the device, seeding and determinism, and a clean shutdown.

The trainer runs the same way under ``python -m`` (one process) and ``torchrun`` (``WORLD_SIZE`` set):
NCCL on GPUs, gloo on CPUs, and both on GPUs whose parameters FSDP keeps on the host (``backend``). Shutdown
passes a barrier before destroying the group: without it a fast rank can tear the group down while a slow one
is still inside a collective and the job aborts after finishing.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import random
import resource

import numpy as np
import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process sits: its global rank, the world size, its local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def backend(*, device_type: str, host_collectives: bool) -> str:
    """The process group's backend: NCCL on GPUs, gloo on CPUs; with ``host_collectives`` a GPU run's group
    also carries host tensors through gloo. FSDP's CPU offload needs that: its gradients, and so the gradient
    norm that clipping all-reduces over the mesh, live on the host, which NCCL refuses ("No backend type
    associated with device type cpu" at the first step). It is not the default because every group of the
    mesh then opens gloo's connections too, and gloo picks its own network interface on multi-NIC nodes."""
    if device_type != "cuda":
        return "gloo"
    return "cuda:nccl,cpu:gloo" if host_collectives else "nccl"


def init(
    *,
    timeout_seconds: float = 600.0,
    device_type: str = "auto",
    nccl_trace_buffer_size: int | None = None,
    host_collectives: bool = False,
) -> ProcessInfo:
    """Initialises the default process group when launched by torchrun (also for one process, so that a mesh,
    e.g. FSDP over one GPU, can be built), and picks this process's device.

    ``timeout_seconds`` bounds every collective until ``set_timeout`` changes it (start-up: rendezvous, first
    all-gathers, checkpoint restore). ``nccl_trace_buffer_size`` (entries of NCCL's flight recorder, which keeps
    the last collectives of each rank for a post-mortem of a hang) must be set before the group exists, so it
    is exported here as ``TORCH_NCCL_TRACE_BUFFER_SIZE`` and ``TORCH_FR_BUFFER_SIZE`` (its name from torch 2.11);
    None leaves the environment as it is. ``host_collectives``: see ``backend``.
    """
    if nccl_trace_buffer_size is not None:
        if nccl_trace_buffer_size < 0:
            raise ValueError(f"nccl_trace_buffer_size={nccl_trace_buffer_size} must be >= 0 (0 turns it off)")
        os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] = str(nccl_trace_buffer_size)  # torch < 2.11
        os.environ["TORCH_FR_BUFFER_SIZE"] = str(nccl_trace_buffer_size)  # its name from torch 2.11 on
    if timeout_seconds <= 0:
        raise ValueError(f"timeout_seconds={timeout_seconds} must be positive")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if (world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ) and not dist.is_initialized():
        dist.init_process_group(
            backend=backend(device_type=device_type, host_collectives=host_collectives),
            timeout=datetime.timedelta(seconds=timeout_seconds),
            device_id=device if device_type == "cuda" else None,
        )
    return ProcessInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def seed_everything(*, seed: int, deterministic: bool) -> None:
    """Seeds Python, NumPy and torch; with ``deterministic`` also asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict:
    """Every RNG this process uses, as plain picklable values, for exact resume."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restores what ``rng_state`` captured."""
    random.setstate(_as_python_state(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _as_python_state(value):
    """``random.setstate`` needs tuples; a state that went through JSON comes back as lists."""
    version, internal, gauss = value
    return (version, tuple(internal), gauss)


def all_reduce_sum(value: torch.Tensor, *, group=None) -> torch.Tensor:
    """Sum over ``group`` (default: every process; identity in a single process).

    Tensor-parallel peers read the same data, so token counts and losses are summed over the data and context
    ranks only (the mesh's ``dp_cp`` group), never over the whole world.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value


def group_size(group=None) -> int:
    """Number of processes in ``group`` (default: every process; 1 without a process group)."""
    if not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def set_timeout(*, seconds: float, groups=()) -> None:
    """Sets the collective timeout of the default group and of ``groups`` (the mesh's groups, which torch
    creates with its own default): start-up may take long, a training step should not, and a hung rank is
    found sooner with a short one."""
    if seconds <= 0:
        raise ValueError(f"timeout seconds={seconds} must be positive")
    if not dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=seconds)
    for group in (None, *groups):
        dist.distributed_c10d._set_pg_timeout(timeout, group)


def device_capacity(device: torch.device) -> int | None:
    """The GPU's total memory in bytes; None on a CPU-only run, which is not checked against its memory
    (it can swap; an offloaded GPU run's host share is checked apart, against `host_available`)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def host_available() -> int:
    """Bytes the host can still give this node's processes: available memory plus free swap (psutil).
    Offloaded states that exceed it end in the kernel's out-of-memory kill, which no Python handler sees."""
    import psutil

    return psutil.virtual_memory().available + psutil.swap_memory().free


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: allocated device memory on CUDA, the resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def shutdown() -> None:
    """Barrier, then destroy the process group (if one was created)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
