"""Running a run again: the checkpoint a killed run resumes from, and early stopping that a rerun keeps."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint, EarlyStopping


class ResumePoint(Checkpoint):
    """Writes ``last.ckpt`` at each epoch end and after every ``every_minutes`` of training (0: epoch ends only).

    With the training loader's place in its epoch inside the checkpoint (see
    :class:`training.datamodule.ResumableLoader`), a run killed mid-epoch loses at most
    ``every_minutes`` of work. Lightning writes checkpoints atomically, so a kill
    during a save leaves the previous one whole. As a :class:`Checkpoint`, it runs after
    the other callbacks' epoch-end hooks, so that their state is saved as it ends the epoch.
    The random number generators' states travel with it, so that dropout after a resume
    draws the masks it would have drawn.
    """

    def __init__(self, path: Path, every_minutes: float) -> None:
        self.path = Path(path)
        self.every_seconds = every_minutes * 60
        self._saved_at = time.monotonic()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._saved_at = time.monotonic()

    def state_dict(self) -> dict:
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict) -> None:
        restore_rng_states(state_dict["rng"])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        # Not on a batch that validates: Lightning counts a batch saved at its end as done,
        # validation included, so a run resumed from there would never validate it.
        if not self.every_seconds or validates_after_this_batch(trainer):
            return
        due = time.monotonic() - self._saved_at >= self.every_seconds
        if trainer.strategy.broadcast(due):  # rank 0's clock decides, so that every rank saves together
            self._save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # optimiser, schedule and loader too
        self._saved_at = time.monotonic()


class StopsForGood(EarlyStopping):
    """Early stopping whose stop holds when the finished run is run again: it trains no further step.

    Lightning restores the count of validations without improvement, but checks it only
    after the next validation, so a rerun of a run that early stopping had ended trained
    up to one more epoch and wrote another bundle.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.wait_count >= self.patience:
            trainer.should_stop = True


def validates_after_this_batch(trainer: pl.Trainer) -> bool:
    """Whether Lightning validates once the current training batch has ended (its own test, not a copy)."""
    return trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher)


def rng_states() -> dict:
    """The states of the generators that training draws from: Python's, torch's, and every CUDA device's."""
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    """Put back what :func:`rng_states` took; CUDA's only on a machine with as many devices.

    Under DDP every rank takes rank 0's states, as every rank started from the same seed.
    """
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
