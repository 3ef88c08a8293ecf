"""Interoperability with the real `orbax.checkpoint` client in JAX (CPU).

JAX runs in a subprocess (2 host CPU devices, so a restore can use another
sharding than the one the torch side wrote) and exchanges reference values
with the test through .npy files of raw bits.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from flame_gin.checkpoint import Checkpointer, load_orbax_params

REPO = pathlib.Path(__file__).resolve().parents[1]
JAX_ENV = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
    PYTHONPATH=str(REPO),
)


def _model():
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(30, 8, dtype=torch.bfloat16)
    model.proj = torch.nn.Linear(8, 6)  # float32
    return model


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.detach().view({2: torch.int16, 4: torch.int32}[t.element_size()]).numpy()


def _run_jax(code: str, cwd: pathlib.Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=JAX_ENV, cwd=cwd, capture_output=True, timeout=120,
    )
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.timeout(150)
def test_jax_restores_torch_checkpoint_and_back(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    Checkpointer(directory=tmp_path / "ckpt").save(
        step=7, model=model, optimizer=opt, extra={}, config_text=""
    )
    for name, t in model.state_dict().items():
        np.save(tmp_path / f"ref_{name}.npy", _bits(t))

    # JAX: restore as saved, into a 2-device sharding, and via the manager;
    # then save new params from JAX arrays for the reverse direction.
    _run_jax(
        """
        import os
        import jax, jax.numpy as jnp, numpy as np, orbax.checkpoint as ocp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        item = os.path.abspath("ckpt/7/model")
        def bits(a):
            a = np.asarray(a)
            return a.view({2: np.int16, 4: np.int32}[a.dtype.itemsize])
        def check(tree):
            for name in ("embed.weight", "proj.weight", "proj.bias"):
                ref = np.load(f"ref_{name}.npy")
                assert np.array_equal(bits(tree[name]), ref), name
        check(ocp.StandardCheckpointer().restore(item))
        mesh = Mesh(np.array(jax.devices()), ("x",))
        meta = ocp.StandardCheckpointer().metadata(item)
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
        target = {}
        for name, m in tree.items():
            spec = P("x") if m.shape[0] % 2 == 0 else P()
            target[name] = jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=NamedSharding(mesh, spec))
        got = ocp.StandardCheckpointer().restore(item, target)
        assert got["embed.weight"].dtype == jnp.bfloat16
        assert len(got["embed.weight"].sharding.device_set) == 2
        assert got["embed.weight"].addressable_shards[1].index[0] == slice(15, 30)
        check(got)
        mgr = ocp.CheckpointManager(os.path.abspath("ckpt"))
        assert mgr.all_steps() == [7], mgr.all_steps()
        check(mgr.restore(7, args=ocp.args.Composite(model=ocp.args.StandardRestore())).model)
        opt = ocp.StandardCheckpointer().restore(os.path.abspath("ckpt/7/optimizer"))
        assert float(opt["state.proj.weight.step"]) == 1.0
        # Reverse: JAX arrays (nested tree, sharded over 2 devices) saved by Orbax.
        key = jax.random.PRNGKey(1)
        params = {
            "embed": {"weight": jax.device_put(jax.random.normal(key, (30, 8)).astype(jnp.bfloat16), NamedSharding(mesh, P("x")))},
            "proj": {"weight": jax.random.normal(key, (6, 8)), "bias": jnp.arange(6, dtype=jnp.float32)},
        }
        ck = ocp.StandardCheckpointer()
        ck.save(os.path.abspath("from_jax"), params)
        ck.wait_until_finished()
        np.save("jax_embed.npy", bits(params["embed"]["weight"]))
        np.save("jax_proj.npy", bits(params["proj"]["weight"]))
        print("JAX-OK")
        """,
        cwd=tmp_path,
    )
    fresh = _model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    load_orbax_params(item_dir=tmp_path / "from_jax", model=fresh)
    assert np.array_equal(_bits(fresh.embed.weight), np.load(tmp_path / "jax_embed.npy"))
    assert np.array_equal(_bits(fresh.proj.weight), np.load(tmp_path / "jax_proj.npy"))
    assert torch.equal(fresh.proj.bias, torch.arange(6, dtype=torch.float32))
