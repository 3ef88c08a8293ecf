"""Checkpoints across meshes with real gloo process groups and FSDP2 on CPU.

One 2-process run (this file run as a script) trains a tiny FSDP2 model,
saves it, and loads a single-process checkpoint at 2 ranks (1 -> 2). The
test process then loads the 2-rank FSDP checkpoint without FSDP at 1 rank
(2 -> 1, FSDP -> no FSDP) and compares bitwise against full tensors that
the 2-rank run gathered itself.
"""

import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # subprocess / multi-process runs: the full suite only

REPO = pathlib.Path(__file__).resolve().parents[1]


class Tiny(torch.nn.Module):
    # Odd sizes: shards of dim 0 are uneven (32 + 31 rows, 25 + 24 ...).
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(63, 16)
        self.proj = torch.nn.Linear(16, 49)
        self.head = torch.nn.Linear(49, 63, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(self.embed(x))))


def _train(model, opt, *, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 63, (4, 8), generator=gen)
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _worker(rank: int, world: int, port: int, root: pathlib.Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from flame_gin.checkpoint import Checkpointer, load_weights

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))

        def sharded(seed):
            torch.manual_seed(seed)
            model = Tiny()
            for m in (model.embed, model.proj, model.head):
                fully_shard(m, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

        # 1 -> 2: a single-process checkpoint loads into FSDP shards.
        model, _ = sharded(seed=11)
        load_weights(directory=root / "single", model=model)
        full = {k: _full(v) for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(full, root / "one_to_two.pt")

        # FSDP training, then an async save of model + optimizer.
        model, opt = sharded(seed=0)
        _train(model, opt, steps=2, seed=1)
        ckpt = Checkpointer(directory=root / "fsdp", keep=2, async_save=True)
        ckpt.save(step=2, model=model, optimizer=opt, extra={"rank": rank}, config_text="")
        ckpt.wait()
        ref = {
            "model": {k: _full(v) for k, v in model.state_dict().items()},
            "optim": {
                f"{name}.{key}": _full(opt.state[p][key])
                for name, p in model.named_parameters()
                for key in ("exp_avg", "exp_avg_sq")
            },
        }
        # Same mesh, fresh objects: resume and continue equals continuing.
        again, again_opt = sharded(seed=5)
        extra = ckpt.restore(model=again, optimizer=again_opt)
        assert extra == {"rank": rank}, extra
        assert ckpt.restored_extras == [{"rank": 0}, {"rank": 1}]
        _train(model, opt, steps=1, seed=2)
        _train(again, again_opt, steps=1, seed=2)
        for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
            assert torch.equal(_full(a), _full(b)), k
        ckpt.close()
        if rank == 0:
            torch.save(ref, root / "fsdp_ref.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_meshes_fsdp_gloo(tmp_path):
    from flame_gin.checkpoint import Checkpointer, reader, save_seed_checkpoint

    torch.manual_seed(3)
    single = Tiny()
    save_seed_checkpoint(directory=tmp_path / "single", model=single)

    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), "2", str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=170)[0].decode() for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]

    # 1 -> 2 gave exactly the single-process weights.
    got = torch.load(tmp_path / "one_to_two.pt")
    for k, v in single.state_dict().items():
        assert torch.equal(got[k], v), k

    # Each rank wrote only its own chunks of a sharded array.
    import tensorstore as ts

    from flame_gin.checkpoint import layout

    item = tmp_path / "fsdp" / "2" / "model"
    keys = []
    for r in range(2):
        kv = ts.KvStore.open(layout.ocdbt_kvstore(path=item / f"ocdbt.process_{r}", for_write=False)).result()
        keys.append({k.decode() for k in kv.list().result() if k.startswith(b"embed.weight/")})
    assert "embed.weight/c.0.0" in keys[0] and "embed.weight/c.0.0" not in keys[1]
    assert "embed.weight/c.1.0" in keys[1] and "embed.weight/c.1.0" not in keys[0]

    # 2 -> 1 and FSDP -> no FSDP: plain module, plain AdamW.
    ref = torch.load(tmp_path / "fsdp_ref.pt")
    plain = Tiny()
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    extra = Checkpointer(directory=tmp_path / "fsdp").restore(model=plain, optimizer=plain_opt)
    assert extra == {"rank": 0}
    for k, v in plain.state_dict().items():
        assert torch.equal(v, ref["model"][k]), k
    for name, p in plain.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(plain_opt.state[p][key], ref["optim"][f"{name}.{key}"])
    assert reader.stored_names(item_dir=item) == list(plain.state_dict())


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4]))
