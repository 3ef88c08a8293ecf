"""How a run starts: its own checkpoint, a warm start from elsewhere, or fresh weights.

In order of precedence: the run's own checkpoint (the latest, or ``restore_step``) brings back everything
(weights, optimizer, step, every rank's data-iterator and RNG state) so a resumed run is the same run; without
one, ``init_from`` (another run's checkpoints directory, or a seed checkpoint) or ``init_from_hf`` (a Hugging
Face model directory) load weights only; otherwise the seeded initialisation stands. A seed checkpoint is the
model's initial weights saved before any training, so runs at any mesh can start from identical weights.
"""

from __future__ import annotations

import dataclasses
import os

from absl import logging

from flame_gin import checkpoint, process
from flame_gin.checkpoint import hf

SEED_CHECKPOINT_DIR = "seed_checkpoint"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Start:
    """How the run starts (gin: ``flame_gin.start``; the run takes ``@flame_gin.start()``).

    ``restore_step`` resumes that step of the run's own checkpoints instead of the latest; ``init_from`` (another
    run's checkpoints directory or a seed checkpoint) or ``init_from_hf`` (a Hugging Face model directory) load
    weights when the run has no checkpoint of its own; ``seed_checkpoint_only`` writes the initial weights to
    ``WORKDIR/seed_checkpoint`` and stops before training.
    """

    restore_step: int | None = None
    init_from: str | None = None
    init_from_hf: str | None = None
    seed_checkpoint_only: bool = False

    def resumes(self, *, ckpt) -> bool:
        """Whether the run restores its own checkpoint (so every saved tensor comes from there), known before
        the model is built; a run that only writes its seed checkpoint restores nothing."""
        return not self.seed_checkpoint_only and _resumes(ckpt=ckpt, restore_step=self.restore_step)

    def resume_or_initialise(self, *, ckpt, model, optimizer, loader) -> dict | None:
        """``resume_or_initialise`` with these settings."""
        return resume_or_initialise(
            ckpt=ckpt,
            model=model,
            optimizer=optimizer,
            loader=loader,
            restore_step=self.restore_step,
            init_from=self.init_from,
            init_from_hf=self.init_from_hf,
        )


def data_states(extras: list[dict]) -> list[dict]:
    """One data-iterator state per data stream, in stream order.

    Ranks that differ only in their tensor or context coordinate read the same stream and saved the same
    state, so each data-parallel rank's state is kept once; the loader reshards these if the layout changed.
    """
    if not all("dp_rank" in e for e in extras):
        return [e["data"] for e in extras]
    streams: dict[int, dict] = {}
    for e in extras:
        streams.setdefault(e["dp_rank"], e["data"])
    return [streams[k] for k in sorted(streams)]


def _resumes(*, ckpt, restore_step: int | None) -> bool:
    return ckpt is not None and (restore_step is not None or ckpt.latest_step() is not None)


def resume_or_initialise(
    *,
    ckpt,
    model,
    optimizer,
    loader,
    restore_step: int | None = None,
    init_from: str | None = None,
    init_from_hf: str | None = None,
) -> dict | None:
    """Restores the run's own state when it has any, else warm-starts weights; returns the saved train state.

    Returns None for a run that starts at step 0 (fresh or warm-started).
    """
    if _resumes(ckpt=ckpt, restore_step=restore_step):
        latest = ckpt.latest_step()
        own = ckpt.restore(model=model, optimizer=optimizer, step=restore_step)
        if restore_step is not None and latest is not None and latest > restore_step:
            logging.warning(
                "restored step %d although step %d exists: later steps are not overwritten", restore_step, latest
            )
        try:
            loader.load_state_dict(data_states(ckpt.restored_extras or [own]))
        except ValueError as e:  # a state this loader cannot continue: said before any step, nothing written
            raise checkpoint.CheckpointError(f"step {own['train_state']['step']}: data loader state: {e}") from e
        process.set_rng_state(own["rng"])
        logging.info(
            "resumed from step %d (%s tokens seen)",
            own["train_state"]["step"],
            f"{own['train_state']['tokens_seen']:,}",
        )
        return own["train_state"]
    if init_from is not None:
        step = checkpoint.load_weights(directory=init_from, model=model)
        logging.info("warm start: weights of step %d from %s", step, init_from)
    elif init_from_hf is not None:
        hf.import_hf(path=init_from_hf, model=model)
        logging.info("warm start: weights from the Hugging Face model %s", init_from_hf)
    return None


def save_seed(*, workdir: str | os.PathLike, model, config_text: str) -> str:
    """Writes the model's initial weights as ``WORKDIR/seed_checkpoint`` (step 0); returns the directory.

    Later runs name it with ``flame_gin.start.init_from`` to start from exactly these weights, at any mesh.
    """
    directory = os.path.join(os.fspath(workdir), SEED_CHECKPOINT_DIR)
    checkpoint.save_seed_checkpoint(directory=directory, model=model, config_text=config_text)
    logging.info("seed checkpoint written to %s", directory)
    return directory
