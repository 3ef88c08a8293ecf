"""Seed checkpoints and weights-only warm starts.

A seed checkpoint holds freshly initialised weights and nothing else, so
runs at any mesh (or any number of ranks) start from identical parameters
instead of depending on how initialisation interacts with sharding.
"""

from __future__ import annotations

import os

import torch

from flame_gin.checkpoint.checkpointer import Checkpointer


def save_seed_checkpoint(
    *,
    directory: str | os.PathLike,
    model: torch.nn.Module,
    config_text: str = "",
    step: int = 0,
) -> None:
    """Save `model`'s current (initial) weights as step `step`, no optimizer."""
    ckpt = Checkpointer(directory=directory, async_save=False)
    try:
        ckpt.save(step=step, model=model, optimizer=None, extra={}, config_text=config_text, force=True)
    finally:
        ckpt.close()


def load_weights(*, directory: str | os.PathLike, model: torch.nn.Module, step: int | None = None) -> int:
    """Load only the weights of a checkpoint (latest, or `step`) into `model`.

    For warm starts from another run or from a seed checkpoint; returns the
    step loaded. Collective when torch.distributed is initialised.
    """
    ckpt = Checkpointer(directory=directory, async_save=False)
    try:
        chosen = ckpt.latest_step() if step is None else step
        ckpt.restore(model=model, optimizer=None, step=chosen)
        return chosen
    finally:
        ckpt.close()


def load_orbax_params(*, item_dir: str | os.PathLike, model: torch.nn.Module) -> None:
    """Load parameters saved by `orbax.checkpoint` (e.g. from JAX) into `model`.

    `item_dir` is an Orbax PyTree directory whose tree paths, joined with
    '.', are the model's state_dict names ({"embed.weight": array} or the
    nested {"embed": {"weight": array}}). Sharded targets read only their
    own boxes.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from flame_gin.checkpoint import reader

    reader.read_item(item_dir=item_dir, tensors=get_model_state_dict(model), step=None)
