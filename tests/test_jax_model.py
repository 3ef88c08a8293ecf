"""`flame_gin.jax`: a checkpoint restored with Orbax in a fresh JAX process (no torch imported) gives the
logits flame_gin's own model gives, float32, within 1e-4 absolute (logits here are O(1-10); the two sides
differ only in summation order and the recurrent vs chunked form of the same recurrence). Checkpoints: the
tiny run's (the user's path: train, then restore in JAX), a GLA built with the options the tiny run leaves off
(short convolutions, grouped key/value heads, unfused output norm, clamped gates), and DeltaNet with and
without short convolutions."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from flame_gin import kernels
from flame_gin.checkpoint import Checkpointer, hf

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
JAX_SIDE = """
import sys, numpy as np
import flame_gin.jax as fj
params, config = fj.load(sys.argv[1])
np.save(sys.argv[3], np.asarray(fj.logits(params=params, config=config, tokens=np.load(sys.argv[2]))))
assert "torch" not in sys.modules, "flame_gin.jax imported torch"
"""


def _jax_logits(step_dir: pathlib.Path, tokens: np.ndarray, tmp: pathlib.Path) -> np.ndarray:
    np.save(tmp / "tokens.npy", tokens)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(JAX_SIDE), str(step_dir), str(tmp / "tokens.npy"), str(tmp / "jax.npy")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(tmp / "jax.npy")


def _torch_logits(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens)).logits.float().numpy()


def _reference(config, *, size: tuple[int, int], seed: int, tweak=None):
    """The model of ``config`` (torch seed 0, reference kernels, ``tweak(model)`` applied without gradients),
    random tokens of ``size`` and its float32 logits."""
    from transformers import AutoModelForCausalLM

    kernels.select(mode="reference")
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if tweak is not None:
            with torch.no_grad():
                tweak(model)
        tokens = np.random.default_rng(seed).integers(0, config.vocab_size, size=size)
        return model, tokens, _torch_logits(model, tokens)
    finally:
        kernels.restore()


def _save(model: torch.nn.Module, tmp_path: pathlib.Path) -> pathlib.Path:
    """The model saved as step 1 of a checkpoint under ``tmp_path``; the step's folder."""
    Checkpointer(directory=tmp_path / "ckpt").save(step=1, model=model, optimizer=None, extra={}, config_text="")
    return tmp_path / "ckpt" / "1"


@pytest.mark.slow
def test_tiny_run_checkpoint_runs_in_jax(tmp_path, train_tiny):
    run = tmp_path / "run"
    train_tiny(run)
    tokens = np.random.default_rng(0).integers(0, 512, size=(2, 80))
    kernels.select(mode="reference")
    try:
        model, step = hf.load_checkpoint_model(checkpoint_dir=run / "checkpoints")
        ref = _torch_logits(model, tokens)
    finally:
        kernels.restore()
    got = _jax_logits(run / "checkpoints" / str(step), tokens, tmp_path)
    assert got.shape == ref.shape == (2, 80, 512)
    assert np.abs(got - ref).max() < TOLERANCE, np.abs(got - ref).max()


@pytest.mark.slow
def test_gla_options_match_in_jax(tmp_path):
    from fla.models import GLAConfig

    config = GLAConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=97,
        intermediate_size=96,
        use_short_conv=True,
        conv_size=3,
        fuse_norm=False,
        clamp_min=-0.05,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )

    def wide_gate_biases(model):  # larger-than-init gate biases, so gates and the clamp both matter
        for layer in model.model.layers:
            layer.attn.gk_proj[1].bias.uniform_(-6.0, 3.0)

    model, tokens, ref = _reference(config, size=(3, 70), seed=1, tweak=wide_gate_biases)
    step_dir = _save(model, tmp_path)
    saved = json.loads((step_dir / "model_config.json").read_text())
    assert saved["use_short_conv"] and saved["num_kv_heads"] == 2 and not saved["fuse_norm"]
    got = _jax_logits(step_dir, tokens, tmp_path)
    assert np.abs(got - ref).max() < TOLERANCE, np.abs(got - ref).max()
    # The check has teeth: without the clamp the JAX side differs.
    saved["clamp_min"] = None
    (step_dir / "model_config.json").write_text(json.dumps(saved))
    assert np.abs(_jax_logits(step_dir, tokens, tmp_path) - ref).max() > 100 * TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("short_conv", [True, False])
def test_delta_net_matches_in_jax(tmp_path, short_conv):
    from fla.models import DeltaNetConfig

    config = DeltaNetConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_heads=2,
        vocab_size=97,
        intermediate_size=96,
        use_short_conv=short_conv,
        conv_size=4,
        initializer_range=0.2,
    )
    model, tokens, ref = _reference(config, size=(2, 90), seed=2)
    step_dir = _save(model, tmp_path)
    assert json.loads((step_dir / "model_config.json").read_text())["model_type"] == "delta_net"
    got = _jax_logits(step_dir, tokens, tmp_path)
    assert np.abs(ref).max() > 1.0  # logits large enough for the comparison to mean something
    assert np.abs(got - ref).max() < TOLERANCE, np.abs(got - ref).max()
