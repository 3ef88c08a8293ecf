"""Use a flame_gin checkpoint in JAX: restore it with Orbax, run the model in `jax.numpy`.

An optional part (the `jax` extra); training never imports it, and it needs
neither torch nor FLA. A checkpoint step directory holds the model's PyTree
(`model/`, torch state_dict names as keys) and the HF config the run trained
(`model_config.json`); `load` reads both, `logits` runs the forward pass of
the families implemented here (by `model_type`).
"""

from __future__ import annotations

import json
import os
import pathlib

from flame_gin.jax import delta_net, gla

FORWARDS = {"gla": gla.logits, "delta_net": delta_net.logits}


def load(step_dir: str | os.PathLike) -> tuple[dict, dict]:
    """(params, config) of one checkpoint step: Orbax's restore of `model/` and `model_config.json`."""
    import orbax.checkpoint as ocp

    step_dir = pathlib.Path(step_dir).resolve()
    config_file = step_dir / "model_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no model config; is {step_dir} a flame_gin checkpoint step?")
    params = ocp.PyTreeCheckpointer().restore(step_dir / "model")
    return params, json.loads(config_file.read_text())


def logits(*, params: dict, config: dict, tokens):
    """Float32 logits [B, T, vocab] of token ids [B, T] for the checkpoint's model."""
    family = config.get("model_type")
    if family not in FORWARDS:
        raise NotImplementedError(
            f"flame_gin.jax: no JAX forward for model_type {family!r}; implemented: {sorted(FORWARDS)}"
        )
    return FORWARDS[family](params=params, config=config, tokens=tokens)
