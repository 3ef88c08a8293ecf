"""Checkpoint save/restore throughput against torch.distributed.checkpoint.

    python benchmarks/checkpoint_throughput.py --size_mb=256 --ranks=1,2
    python benchmarks/checkpoint_throughput.py --size_mb=1024 --ranks=1 --device=cuda

For each number of gloo ranks, a float32 model of `size_mb` (FSDP2-sharded
when ranks > 1) is saved and restored with flame_gin's Checkpointer and with
`torch.distributed.checkpoint` (DCP) in the same processes, best of
`--repeats`. It also measures how long an asynchronous save blocks the
caller, as a fraction of a synchronous save. Restores read from the page
cache (files were just written). The last line printed is one JSON object.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_SIZE_MB = flags.DEFINE_integer("size_mb", 256, "State size in MiB (float32).")
_RANKS = flags.DEFINE_list("ranks", ["1", "2"], "Numbers of gloo ranks to run.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Repeats per measurement (best taken).")
_DIR = flags.DEFINE_string("dir", None, "Scratch folder (default: a temp folder).")
_DEVICE = flags.DEFINE_string("device", "cpu", "Where the state lives: cpu or cuda (1 rank).")
_WORKER = flags.DEFINE_string("worker", None, "Internal: 'rank,world,port'.")

_WIDTH = 1024  # each layer is a WIDTH x WIDTH float32 matrix (4 MiB)


def _model(size_mb: int):
    import torch

    layers = max(1, size_mb * 1024**2 // (_WIDTH * _WIDTH * 4))
    return torch.nn.Sequential(*[torch.nn.Linear(_WIDTH, _WIDTH, bias=False) for _ in range(layers)])


def _best(fn, repeats):
    times = []
    for i in range(repeats):
        times.append(fn(i))
    return min(times)


def _worker(rank: int, world: int, port: int, root: pathlib.Path) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from flame_gin.checkpoint import Checkpointer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _model(_SIZE_MB.value).to(_DEVICE.value)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    repeats = _REPEATS.value

    def timed(fn):
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - start

    def clean(path):
        dist.barrier()
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        dist.barrier()

    ours = Checkpointer(directory=root / "ours", keep=1)
    save = _best(
        lambda i: timed(lambda: ours.save(step=i, model=model, optimizer=None, extra={}, config_text="")), repeats
    )
    restore = _best(lambda i: timed(lambda: ours.restore(model=model)), repeats)
    ours.close()

    def dcp_save(i):
        clean(root / f"dcp{i}")
        return timed(lambda: dcp.save(get_model_state_dict(model), checkpoint_id=str(root / f"dcp{i}")))

    dsave = _best(dcp_save, repeats)
    state = get_model_state_dict(model)
    dload = _best(lambda i: timed(lambda: dcp.load(state, checkpoint_id=str(root / f"dcp{repeats - 1}"))), repeats)

    asynchronous = Checkpointer(directory=root / "async", keep=1, async_save=True)
    blocked = []
    for i in range(repeats):
        dist.barrier()
        asynchronous.save(step=i, model=model, optimizer=None, extra={}, config_text="")
        blocked.append(asynchronous.last_blocked_seconds)
        asynchronous.wait()
    asynchronous.close()
    # The loop waits for the slowest rank; the first save also allocates
    # the reused host buffers, so it is reported apart from steady state.
    per_repeat = dist_all_max(blocked, dist)
    first_blocked, worst_blocked = per_repeat[0], min(per_repeat[1:] or per_repeat)
    if rank == 0:
        gb = nbytes / 1e9
        print(
            json.dumps(
                dict(
                    ranks=world,
                    bytes=nbytes,
                    save_gbps=gb / save,
                    restore_gbps=gb / restore,
                    dcp_save_gbps=gb / dsave,
                    dcp_restore_gbps=gb / dload,
                    save_s=save,
                    restore_s=restore,
                    dcp_save_s=dsave,
                    dcp_restore_s=dload,
                    async_blocked_s=worst_blocked,
                    async_blocked_fraction=worst_blocked / save,
                    async_blocked_first_s=first_blocked,
                )
            ),
            flush=True,
        )
    dist.barrier()
    dist.destroy_process_group()


def dist_all_max(values, dist):
    """Per-repeat maxima over ranks (the loop waits for the slowest rank)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, values)
    return [max(v[i] for v in out) for i in range(len(values))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv):
    del argv
    root = pathlib.Path(_DIR.value or tempfile.mkdtemp(prefix="ckpt_bench_"))
    if _WORKER.value:
        rank, world, port = (int(v) for v in _WORKER.value.split(","))
        _worker(rank, world, port, root)
        return
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo))
    results = []
    for world in (int(r) for r in _RANKS.value):
        port, run_dir = _free_port(), root / f"ranks{world}"
        # As torchrun does: no more intra-op threads than cores per rank
        # (oversubscribed OpenMP makes large copies many times slower).
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    f"--worker={r},{world},{port}",
                    f"--dir={run_dir}",
                    f"--size_mb={_SIZE_MB.value}",
                    f"--repeats={_REPEATS.value}",
                    f"--device={_DEVICE.value}",
                ],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            for r in range(world)
        ]
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit(f"worker failed at {world} ranks: {outs}")
        line = json.loads(outs[0].strip().splitlines()[-1])
        print(json.dumps(line), flush=True)
        results.append(line)
        shutil.rmtree(run_dir, ignore_errors=True)
    print(
        json.dumps(
            {
                "benchmark": "checkpoint_throughput",
                "size_mb": _SIZE_MB.value,
                "device": _DEVICE.value,
                "cpus": os.cpu_count(),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
