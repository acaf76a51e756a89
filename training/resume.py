"""The checkpoint a killed run resumes from: written every few minutes and when training ends."""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint


class ResumePoint(Checkpoint):
    """Writes ``last.ckpt`` after every ``every_minutes`` of training and when training ends.

    With the training loader's place in its epoch inside the checkpoint (see
    :class:`training.datamodule.ResumableLoader`), a run killed mid-epoch loses at most
    ``every_minutes`` of work, so epoch ends need no checkpoint of their own: on a GPU an
    epoch can take seconds, and a checkpoint with Adam's moments is three times the
    weights. With ``every_minutes`` 0 it writes at every epoch end instead. Lightning
    writes checkpoints atomically, so a kill during a save leaves the previous one whole.
    As a :class:`Checkpoint`, it runs after the other callbacks' hooks, so that their
    state is saved as they leave it.
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
        if not self.every_seconds:
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # optimiser, schedule and loader too
        self._saved_at = time.monotonic()
