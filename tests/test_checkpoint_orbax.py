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
        env=JAX_ENV,
        cwd=cwd,
        capture_output=True,
        timeout=120,
    )
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.timeout(150)
def test_jax_restores_torch_checkpoint_and_back(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    Checkpointer(directory=tmp_path / "ckpt").save(step=7, model=model, optimizer=opt, extra={}, config_text="")
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


@pytest.mark.timeout(150)
def test_every_orbax_restore_path_matches_orbax_own_checkpoint(tmp_path):
    """Each common Orbax restore call, with no target, gives on a flame_gin checkpoint what it gives on a
    checkpoint Orbax itself wrote of the same tree: the same keys, dtypes and values as `jax.Array`s on one
    device (the legacy `PyTreeCheckpointer().restore(path)` needs the `_sharding` file Orbax writes)."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    Checkpointer(directory=tmp_path / "ckpt").save(step=7, model=model, optimizer=opt, extra={}, config_text="")
    out = _run_jax(
        """
        import os
        import jax, numpy as np, orbax.checkpoint as ocp
        from orbax.checkpoint.experimental import v1 as ocp_v1
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        ours = os.path.abspath("ckpt")
        # Orbax's own checkpoint of the same trees, written by its CheckpointManager.
        # The trees as a JAX program holds them: jax.Arrays on the default device.
        tree = jax.tree.map(jax.numpy.asarray, ocp.StandardCheckpointer().restore(f"{ours}/7/model"))
        opt = jax.tree.map(jax.numpy.asarray, ocp.StandardCheckpointer().restore(f"{ours}/7/optimizer"))
        theirs = os.path.abspath("orbax_own")
        with ocp.CheckpointManager(theirs) as mgr:
            mgr.save(7, args=ocp.args.Composite(model=ocp.args.StandardSave(tree), optimizer=ocp.args.StandardSave(opt)))
        paths = {
            "StandardCheckpointer": lambda root: ocp.StandardCheckpointer().restore(f"{root}/7/model"),
            "PyTreeCheckpointer": lambda root: ocp.PyTreeCheckpointer().restore(f"{root}/7/model"),
            "Checkpointer(PyTreeCheckpointHandler)": lambda root: ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(f"{root}/7/model"),
            "CheckpointManager, no args": lambda root: ocp.CheckpointManager(root).restore(7).model,
            "CheckpointManager, StandardRestore": lambda root: ocp.CheckpointManager(root).restore(
                7, args=ocp.args.Composite(model=ocp.args.StandardRestore())).model,
            "CheckpointManager, PyTreeRestore": lambda root: ocp.CheckpointManager(root).restore(
                7, args=ocp.args.Composite(model=ocp.args.PyTreeRestore())).model,
            "v1 load_pytree": lambda root: ocp_v1.load_pytree(f"{root}/7", checkpointable_name="model"),
            "optimizer, PyTreeCheckpointer": lambda root: ocp.PyTreeCheckpointer().restore(f"{root}/7/optimizer"),
        }
        def bits(a):
            a = np.asarray(a)
            return a.view({2: np.int16, 4: np.int32}[a.dtype.itemsize]) if a.dtype.itemsize in (2, 4) else a
        for name, restore in paths.items():
            got, ref = restore(ours), restore(theirs)
            assert sorted(got) == sorted(ref), (name, sorted(got), sorted(ref))
            for key in ref:
                a, b = got[key], ref[key]
                assert isinstance(a, jax.Array) and isinstance(b, jax.Array), (name, key, type(a), type(b))
                assert a.dtype == b.dtype and a.shape == b.shape, (name, key, a.dtype, b.dtype)
                assert np.array_equal(bits(a), bits(b)), (name, key)
                assert a.sharding.device_set == {jax.devices()[0]}, (name, key, a.sharding)
            print("PATH-OK", name)
        # A target sharding over both devices still wins over the recorded one.
        mesh = Mesh(np.array(jax.devices()), ("x",))
        target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, P("x") if v.ndim and v.shape[0] % 2 == 0 else P()))
                  for k, v in tree.items()}
        got = ocp.PyTreeCheckpointer().restore(f"{ours}/7/model", args=ocp.args.PyTreeRestore(
            restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
        assert len(got["embed.weight"].sharding.device_set) == 2
        assert np.array_equal(bits(got["embed.weight"]), bits(tree["embed.weight"]))
        print("PATH-OK sharded target")
        """,
        cwd=tmp_path,
    )
    assert out.count("PATH-OK") == 9, out[-3000:]
