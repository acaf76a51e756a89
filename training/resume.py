"""Running a run again: the checkpoint a killed run resumes from, and early stopping that a rerun keeps."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint, EarlyStopping, ModelCheckpoint
from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason
from pytorch_lightning.loops.utilities import _is_max_limit_reached
from pytorch_lightning.plugins.io import TorchCheckpointIO

from genrnn.config import is_rank_zero
from genrnn.errors import ConfigurationError
from genrnn.files import replacing


class CheckpointBeside(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, then renames it into place.

    Lightning's own writes the temporary file in the system's temporary directory; where
    that is another file system (a container's /tmp and a mounted run directory, a tmpfs
    /tmp) the rename fails and it copies into the checkpoint itself, and a kill during the
    copy leaves a truncated checkpoint that no rerun can resume from.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("storage_options: not supported for checkpoints written to local files")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as temporary:
            torch.save(checkpoint, temporary)


def check_resumable(path: Path) -> None:
    """Refuse, in one line, a checkpoint that cannot be read (cut short by a full disk, say)."""
    try:
        with zipfile.ZipFile(path):  # torch's format: a truncated file has no zip directory at its end
            pass
    except (zipfile.BadZipFile, OSError) as error:
        raise ConfigurationError(
            f"{path} cannot be read ({error}): rerun with --no-resume to start afresh, or put back a whole copy"
        ) from None


class ResumePoint(Checkpoint):
    """Writes ``last.ckpt`` every ``every_minutes`` of training (0: at every epoch end) and as training ends.

    With the training loader's place in its epoch inside the checkpoint (see
    :class:`training.datamodule.ResumableLoader`), a run killed mid-epoch loses at most
    ``every_minutes`` of work, and one stopped by SIGTERM none: it saves at the end of the
    batch in flight, or, when the run validates after that batch, of the next batch (of
    the epoch, if every batch validates), and only then stops. The save at the end of the
    last epoch lets a finished run, run again, train no further (and one that ended at
    max_epochs, given more, go on as an unbroken run would). Saving at every epoch end would
    cost more than it keeps: a model's checkpoint with Adam's moments weighs three times
    its weights, and a short epoch on a GPU lasts seconds.
    :class:`CheckpointBeside` writes checkpoints whole, so a kill during a save leaves the
    previous one. As a :class:`Checkpoint`, it runs after
    the other callbacks' epoch-end hooks, so that their state is saved as it ends the epoch.
    Every process's random number generators travel with it, so that dropout after a resume
    draws the masks it would have drawn; a run resumes only on as many processes.
    """

    def __init__(self, path: Path, every_minutes: float) -> None:
        self.path = Path(path)
        self.every_seconds = every_minutes * 60
        self._saved_at = time.monotonic()
        self._terminated = False  # SIGTERM came; the run stops at its next save
        self._interrupted = False  # Ctrl+C came
        self._batches_that_stepped: int | None = None  # the loggers' step to put back after a resume

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning's own SIGTERM handler raises its stop flag at once, so the run stops at
        # Lightning's next look: inside a validation, or just after this callback's last
        # chance to save. It also forwards the signal to the other processes of a
        # distributed run and calls a collective operation from the handler, which meets
        # whatever collective the run is in (a crash or a hang). Lightning installs its
        # handler after setup, so it installs this one instead: it only takes note, and the
        # next batch end decides, on every process together.
        trainer._signal_connector._sigterm_notifier_fn = self._take_note
        # Ctrl+C raises KeyboardInterrupt wherever it finds the main thread. Where that is a
        # finalizer (a progress bar's, a loader's), Python prints "Exception ignored" and goes
        # on: the run trained to its end. So the handler also takes note, and the next batch
        # end raises it again. Where SIGINT is ignored (a shell's background job), it stays so.
        # The call around fit puts the previous handler back (genrnn.errors.interruption_kept).
        main_thread = threading.current_thread() is threading.main_thread()  # where handlers are set
        if main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, self._interrupt)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._saved_at = time.monotonic()

    def _take_note(self, signum: int, frame: object) -> None:
        self._terminated = True

    def _interrupt(self, signum: int, frame: object) -> None:
        self._interrupted = True
        raise KeyboardInterrupt

    def _raise_if_interrupted(self) -> None:
        """Raise again a Ctrl+C that the code it found swallowed."""
        if self._interrupted:
            raise KeyboardInterrupt

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # Every rank saves together (see on_train_batch_end), so every rank takes part in the gather.
        checkpoint[RNG_KEY] = gather_from_every_rank(rng_states())

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # Called before Lightning restores its loops from the same checkpoint.
        if resume_within_the_epoch(checkpoint, trainer) == "whole":
            # Lightning goes through that epoch's end again, counting its last batch once more
            # among those that stepped when it validates: put back as the epoch ends, below,
            # or every later log would be a step late.
            loops = checkpoint["loops"]["fit_loop"]
            self._batches_that_stepped = loops["epoch_loop.state_dict"]["_batches_that_stepped"]
        states = checkpoint.get(RNG_KEY)
        if states is None:  # a checkpoint from before the generators were saved
            return
        if len(states) != trainer.world_size:
            raise ConfigurationError(
                f"{self.path} was saved by {len(states)} training processes and this run has "
                f"{trainer.world_size}: resume it with the --devices and --num-nodes it started with"
            )
        restore_rng_states(states[trainer.global_rank])

    def _decide(self, trainer: pl.Trainer, epoch_end: bool) -> tuple[bool, bool]:
        """Whether a timed save is due, and whether SIGTERM came: rank 0's answers, on every rank.

        Every rank saves and stops together, and SIGTERM may reach rank 0 alone.
        """
        if self.every_seconds:
            timed = time.monotonic() - self._saved_at >= self.every_seconds
        else:
            timed = epoch_end
        return trainer.strategy.broadcast((timed, self._terminated))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self._raise_if_interrupted()
        timed, terminated = self._decide(trainer, epoch_end=False)
        # Not on a batch that validates: Lightning counts a batch saved at its end as done,
        # validation included, so a run resumed from there would never validate it.
        if validates_after_this_batch(trainer):
            self._terminated |= terminated  # every rank remembers rank 0's decision until it can save
            return
        if timed or terminated:
            self._save(trainer)
        if terminated:
            self._stop(trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self._raise_if_interrupted()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._batches_that_stepped is not None:  # a resume at a whole epoch's end: no batch ran since
            trainer.fit_loop.epoch_loop._batches_that_stepped = self._batches_that_stepped
            self._batches_that_stepped = None
        timed, terminated = self._decide(trainer, epoch_end=True)
        # Training's end is saved here, not in on_train_end: by then weight averaging has put
        # the averaged weights in place of the trained ones.
        if timed or terminated or training_ends_after_this_epoch(trainer):
            self._save(trainer)
        if terminated:
            self._stop(trainer)

    @staticmethod
    def _stop(trainer: pl.Trainer) -> None:
        """Raise Lightning's SIGTERM flag (its own handler is replaced): it stops at its next look, just after."""
        trainer._signal_connector.received_sigterm = True

    def _save(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # optimiser, schedule and loader too
        self._saved_at = time.monotonic()
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, BestCheckpoint):
                callback.resume_point_saved(trainer)


class StopsForGood(EarlyStopping):
    """Early stopping whose stop holds when the finished run is run again: it trains no further step.

    Lightning restores the count of validations without improvement, but checks it only
    after the next validation, so a rerun of a run that early stopping had ended trained
    up to one more epoch and wrote another bundle.
    """

    @property
    def state_key(self) -> str:
        # Lightning's own early stopping's key, so that checkpoints it wrote keep their count.
        return f"EarlyStopping{dict(monitor=self.monitor, mode=self.mode)!r}"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stopped = self.stopping_reason != EarlyStoppingReason.NOT_STOPPED
        if stopped or self.wait_count >= self.patience:  # the count alone, for checkpoints without a reason
            trainer.should_stop = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not the validation Lightning adds where a budget stops the run mid-epoch: the run,
        # given more, goes on as an unbroken run would, which had not counted it.
        if trainer.should_stop and not validates_by_schedule(trainer):
            return
        super().on_validation_end(trainer, pl_module)


class BestCheckpoint(ModelCheckpoint):
    """The best checkpoint on the dev metric, whose record follows its run directory when that is moved.

    Lightning records the checkpoints' absolute paths, and a run resumed from another directory
    forgot its best score (so that its next validation counted as the best, however it scored)
    but kept the old best path, from which the bundle was then read, or failed to be.
    A resumed run also deletes the best checkpoints that its record does not hold: those a
    killed run saved after its resume point, which nothing would ever delete. And a best
    checkpoint that a better one replaces is deleted only once the resume point records the
    new one: a run killed in between resumes from a point whose best is the old one, which
    it would otherwise not find, on that rerun or any after it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._replaced: list[str] = []  # best checkpoints replaced since the resume point was saved

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        self._replaced.append(filepath)  # see resume_point_saved

    def resume_point_saved(self, trainer: pl.Trainer) -> None:
        """The resume point now records this callback's best: the checkpoints it replaced can go."""
        kept = {*self.best_k_models, self.best_model_path}
        for path in self._replaced:
            if path not in kept:
                super()._remove_checkpoint(trainer, path)
        self._replaced.clear()

    @property
    def state_key(self) -> str:
        # Lightning's own key, so that checkpoints saved before this class keep their record.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        # A budget that ends before the first validation leaves no score to choose by, and the
        # bundle is made from the resume point (see training.train): Lightning's hint, that the
        # module may not log the metric, would send a user looking for a bug.
        if self.monitor not in monitor_candidates and not trainer.fit_loop.epoch_loop.val_loop._has_run:
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and old != self.dirpath:
            state_dict = moved_paths(state_dict, old, self.dirpath)
        super().load_state_dict(state_dict)
        if self.dirpath and is_rank_zero():
            recorded = {Path(p).resolve() for p in [*self.best_k_models, self.best_model_path] if p}
            prefix = self.filename.split("{", 1)[0] if self.filename else ""
            for path in Path(self.dirpath).glob(f"{prefix}*{self.FILE_EXTENSION}"):
                if path.resolve() not in recorded and path.name != f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}":
                    path.unlink(missing_ok=True)


def moved_paths(state_dict: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """A checkpoint callback's state with every path under directory ``old`` moved under ``new``."""

    def move(path: Any) -> Any:
        if isinstance(path, str) and (path == old or path.startswith(old + os.sep)):
            return new + path[len(old) :]
        return path

    state = {key: move(value) for key, value in state_dict.items()}
    state["best_k_models"] = {move(path): score for path, score in state_dict.get("best_k_models", {}).items()}
    return state


# The checkpoint's entry for every process's generators, one a global rank.
RNG_KEY = "genrnn_rng_states"


def validates_after_this_batch(trainer: pl.Trainer) -> bool:
    """Whether Lightning validates once the current training batch has ended (its own test, not a copy)."""
    return trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher)


def validates_by_schedule(trainer: pl.Trainer) -> bool:
    """Whether the run validates after the current training batch by its schedule, whatever stops it."""
    stop = trainer.should_stop
    trainer.should_stop = False  # which Lightning's test also validates on
    try:
        return validates_after_this_batch(trainer)
    finally:
        trainer.should_stop = stop


def training_ends_after_this_epoch(trainer: pl.Trainer) -> bool:
    """Whether the run stops once the epoch ending now has: every way a run ends passes an epoch end.

    The test of Lightning's ``FitLoop.done``, asked without the message that it logs each
    time; a time budget or early stopping has raised ``should_stop`` by the epoch's end.
    """
    loop = trainer.fit_loop
    return (
        _is_max_limit_reached(loop.epoch_loop.global_step, loop.max_steps)
        or _is_max_limit_reached(loop.epoch_progress.current.processed, loop.max_epochs)
        or (trainer.should_stop and loop._can_stop_early)
    )


def resume_within_the_epoch(checkpoint: dict, trainer: pl.Trainer) -> str | None:
    """Let a run resumed from a save at an epoch's end go on as an unbroken run would.

    Lightning counts an epoch as processed before the hooks that save at its end, whatever
    ended it. A run resumed from there started the next epoch: a run stopped by its time or
    step budget, given more, skipped the rest of the epoch the budget had cut. A run with a
    step budget (which Lightning resumes within the epoch), resumed from a whole epoch's
    end, counted that epoch twice, so that its later epochs drew other orders than an
    unbroken run's. Marked as saved within the epoch, after its last batch, both go on at
    the next batch, as after any save within an epoch (the loader's place travels in the
    checkpoint). A whole epoch after which no epoch is left stays as it is: the run is
    over, and its epoch's end must not run again.

    Returns how the epoch ended, ``"cut short"`` or ``"whole"``, where the checkpoint was
    marked; ``None`` where it was left as it is.
    """
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = loops.get("epoch_progress"), loops.get("epoch_loop.batch_progress")
    if epochs is None or batches is None:
        return None
    total = epochs["total"]
    if not (total["processed"] == total["started"] and total["completed"] == total["processed"] - 1):
        return None  # not saved at an epoch's end
    cut_short = not batches["is_last_batch"]
    step_budget = trainer.max_steps != -1
    epochs_left = trainer.max_epochs in (None, -1) or total["processed"] < trainer.max_epochs
    if not (cut_short or (step_budget and epochs_left)):
        return None  # Lightning starts the next epoch, or ends the run, rightly
    for count in (epochs["current"], epochs["total"]):
        count["processed"] = count["completed"]
    if not cut_short:
        return "whole"
    # As saved as the last batch ended: Lightning completes that batch, skips its validation,
    # and counts it once more among the batches that stepped (the loggers' step).
    for count in (batches["current"], batches["total"]):
        count["completed"] -= 1
    loops["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1
    return "cut short"


def rng_states() -> dict:
    """The states of the generators this process draws from: Python's, torch's, and its CUDA device's."""
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()  # the current device: each process drives one
    return states


def restore_rng_states(states: dict) -> None:
    """Put back what :func:`rng_states` took."""
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def gather_from_every_rank(value: object) -> list:
    """``value`` from every process of the run, in the order of their global ranks."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered
