"""Checkpoints in Orbax's on-disk format, written from PyTorch with tensorstore.

`Checkpointer` saves and restores model, optimizer and plain training state
(sharded or not, synchronously or in the background), opened from `CheckpointSettings`; `seed` writes an
untrained starting point; `hf` exports to and imports from Hugging Face;
`preemption` turns scheduler signals into a flag the loop polls.
"""

from flame_gin.checkpoint.checkpointer import Checkpointer, CheckpointSaveError
from flame_gin.checkpoint.preemption import REQUEUE_EXIT_CODE, PreemptionFlag
from flame_gin.checkpoint.reader import CheckpointCorruptError, CheckpointError
from flame_gin.checkpoint.seed import load_orbax_params, load_weights, save_seed_checkpoint
from flame_gin.checkpoint.settings import CheckpointSettings

__all__ = [
    "Checkpointer",
    "CheckpointSettings",
    "CheckpointSaveError",
    "CheckpointError",
    "CheckpointCorruptError",
    "PreemptionFlag",
    "REQUEUE_EXIT_CODE",
    "save_seed_checkpoint",
    "load_weights",
    "load_orbax_params",
]
