"""A run's checkpoint settings, checked before anything is built, and opened into a ``Checkpointer`` later.

Why apart from the ``Checkpointer``: opening one creates its directory and its process groups, which must wait
until the run is known to be sound (the model config built, the data found), while a wrong setting
(``KEEP_CHECKPOINTS=0``) should be reported with the other cheap checks, in seconds. The settings are what gin
configures (``flame_gin.checkpointer``; the run takes ``@flame_gin.checkpointer()``).
"""

from __future__ import annotations

import dataclasses
import os

from flame_gin.checkpoint import writer


def validate(*, keep: int | None, compression: str | None) -> None:
    """Raises a ``ValueError`` naming the setting when ``keep`` or ``compression`` cannot work."""
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep={keep}: must be >= 1 or None (flame_gin.checkpointer.keep, KEEP_CHECKPOINTS)")
    if compression not in writer.COMPRESSORS:
        raise ValueError(f"compression={compression!r}: use None or 'zstd' (flame_gin.checkpointer.compression)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSettings:
    """``keep``: checkpoints kept (None: all); ``keep_every``: steps whose checkpoints are never deleted;
    ``interval_steps`` / ``interval_seconds``: when a save is due; ``async_save``: write in the background;
    ``compression``: None or ``zstd``; ``fallback_to_previous``: a damaged latest checkpoint is moved aside and
    the one before it restored (False: stop with the error)."""

    keep: int | None = None
    keep_every: int | None = None
    async_save: bool = False
    interval_steps: int | None = None
    interval_seconds: float | None = None
    compression: str | None = None
    fallback_to_previous: bool = True

    def validate(self) -> None:
        validate(keep=self.keep, compression=self.compression)

    def open(self, *, directory: str | os.PathLike, process_group=None):
        """The ``Checkpointer`` of ``directory`` with these settings (creates the directory on the primary)."""
        from flame_gin.checkpoint.checkpointer import Checkpointer

        return Checkpointer(directory=directory, process_group=process_group, **dataclasses.asdict(self))
