"""The checkpoint a killed run resumes from: written at every epoch end and every few minutes."""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint


class ResumePoint(Checkpoint):
    """Writes ``last.ckpt`` at each epoch end and after every ``every_minutes`` of training (0: epoch ends only).

    With the training loader's place in its epoch inside the checkpoint (see
    :class:`training.datamodule.ResumableLoader`), a run killed mid-epoch loses at most
    ``every_minutes`` of work. Lightning writes checkpoints atomically, so a kill
    during a save leaves the previous one whole. As a :class:`Checkpoint`, it runs after
    the other callbacks' epoch-end hooks, so that their state is saved as it ends the epoch.
    """

    def __init__(self, path: Path, every_minutes: float) -> None:
        self.path = Path(path)
        self.every_seconds = every_minutes * 60
        self._saved_at = time.monotonic()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._saved_at = time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if not self.every_seconds:
            return
        due = time.monotonic() - self._saved_at >= self.every_seconds
        if trainer.strategy.broadcast(due):  # rank 0's clock decides, so that every rank saves together
            self._save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # optimiser, schedule and loader too
        self._saved_at = time.monotonic()
