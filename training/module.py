"""The LightningModule: teacher-forced training of :class:`genrnn.model.Seq2Seq`."""

from __future__ import annotations

import math
from dataclasses import astuple

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Timer

from genrnn.config import ExperimentConfig, from_dict, to_dict
from genrnn.data import Batch
from genrnn.decoding import Generator, wide_dtype
from genrnn.evaluation import best_outputs
from genrnn.metrics import ErrorCounts, error_counts
from genrnn.model import Seq2Seq
from genrnn.tokenizer import PAD_ID
from training.distillation import Distillation


class Seq2SeqModule(pl.LightningModule):
    """Cross-entropy on ``y1 … yn EOS`` given ``BOS y1 … yn``; dev WER/PER by greedy decoding.

    With a :class:`Distillation`, training mixes in the cross-entropy with a teacher's
    distributions; validation scores the reference alone.
    """

    def __init__(self, config: dict, source_vocab_size: int, target_vocab_size: int) -> None:
        super().__init__()
        self.save_hyperparameters()  # plain data only, so checkpoints restore without our classes
        self.config = from_dict(ExperimentConfig, config)
        self.model = Seq2Seq(self.config.model, source_vocab_size, target_vocab_size)
        self.distillation: Distillation | None = None
        # Set from a resumed checkpoint whose optimiser holds one group (see parameter_groups).
        self.decays_every_parameter = False

    @classmethod
    def from_config(cls, config: ExperimentConfig, source_vocab_size: int, target_vocab_size: int):
        return cls(to_dict(config), source_vocab_size, target_vocab_size)

    def reference_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean token cross-entropy with the reference over non-padding target positions.

        ``logits`` may be log-probabilities: their log-softmax is themselves.
        """
        return F.cross_entropy(
            logits.flatten(0, 1).float(),
            batch.target_out.flatten(),
            ignore_index=PAD_ID,
            label_smoothing=self.config.training.label_smoothing,
        )

    def on_train_start(self) -> None:
        """Make the teacher's table; after the callbacks' hook, so that a time budget counts it."""
        distillation = self.distillation
        # A rerun of a finished run stops before its first step (see training.resume.StopsForGood).
        if distillation is not None and not self.trainer.should_stop:
            datamodule = self.trainer.datamodule
            seconds = distillation.prepare(datamodule.train_set, self.device, datamodule.config.max_tokens)
            if seconds is not None and self.trainer.is_global_zero:
                pairs, size = len(datamodule.train_set), distillation.table_bytes / 2**20
                print(
                    f"teacher's distributions for {pairs} training pairs in {seconds:.0f} s: a table of {size:.0f} MiB"
                )
                if distillation.on_made is not None:
                    distillation.on_made(distillation)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | dict[str, torch.Tensor]:
        logits = self.model(batch.source, batch.source_lengths, batch.target_in)
        if self.distillation is None:
            return self.reference_loss(logits, batch)
        log_probs = logits.float().log_softmax(dim=-1)  # once, for both losses
        reference, distillation = self.reference_loss(log_probs, batch), self.distillation.loss(log_probs, batch)
        weight = self.config.training.distill_weight
        loss = (1 - weight) * reference + weight * distillation
        return {"loss": loss, "reference_loss": reference.detach(), "distillation_loss": distillation.detach()}

    def on_train_batch_end(self, outputs: dict, batch: Batch, batch_idx: int) -> None:
        """Log the step's values on the steps Lightning writes: every log_every_n_steps, and the last.

        Lightning drops the values of the other steps, and each log call costs host time (about
        0.6 ms on a CPU core). Logged here, after the callbacks, so that the last step is known:
        a time budget ends training in a callback's batch-end hook.
        """
        every = self.trainer.log_every_n_steps
        if not every or (self.global_step % every and not self.trainer.should_stop):
            return
        size = batch.source.shape[0]
        self.log("train_loss", outputs["loss"], prog_bar=True, batch_size=size)
        for name in ("reference_loss", "distillation_loss"):  # the two parts of a distilled loss
            if name in outputs:
                self.log(name, outputs[name], batch_size=size)
        self.log("padding_fraction", batch.padding_fraction, batch_size=size)
        self.log("target_tokens", float(batch.target_tokens), reduce_fx="sum", batch_size=size)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Add the batch's loss and cross-entropy, summed over its target tokens, to the dev sums."""
        log_probs = self.model(batch.source, batch.source_lengths, batch.target_in).float().log_softmax(dim=-1)
        loss = self.reference_loss(log_probs, batch)
        cross_entropy = F.nll_loss(log_probs.flatten(0, 1), batch.target_out.flatten(), ignore_index=PAD_ID)
        tokens = batch.target_tokens
        self._dev_sums += torch.stack([loss * tokens, cross_entropy * tokens, loss.new_tensor(tokens)])

    def on_validation_epoch_end(self) -> None:
        """Log the dev loss (``val_loss``, label smoothing included, as trained) and cross-entropy.

        From every rank's sums: each pair counts once, whatever the number of processes.
        """
        loss, cross_entropy, tokens = self.trainer.strategy.reduce(self._dev_sums, reduce_op="sum")
        # The values agree on every rank: sync_dist averages equal numbers, and keeps Lightning from warning.
        self.log("val_loss", (loss / tokens).item(), prog_bar=True, sync_dist=True)
        self.log("val_nll", (cross_entropy / tokens).item(), sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        """Decode the dev examples, each process its share, and log WER, PER and sequence accuracy.

        Done at the start of validation: callbacks' hooks run before the module's, so
        weight averaging has swapped the averaged weights in here, and has already
        swapped them out again at the end.
        """
        # loss, cross-entropy, tokens; in float64 where the device has it
        self._dev_sums = torch.zeros(3, dtype=wide_dtype(self.device), device=self.device)
        trainer = self.trainer
        examples = trainer.datamodule.dev_examples
        if not examples or trainer.sanity_checking:
            return
        datamodule = trainer.datamodule
        decoding = self.config.decoding
        generator = Generator(
            self.model,
            datamodule.source_tokenizer,
            datamodule.target_tokenizer,
            max_new_tokens_cap=decoding.max_new_tokens,
            seed=self.config.training.seed,
        )
        # Each rank decodes every world_size-th example; the counts add up to the whole set's.
        # (A sampled decoding draws each example's stream by its place in the share: another
        # number of processes samples other outputs.)
        share = examples[trainer.global_rank :: trainer.world_size]
        counts = error_counts(best_outputs(generator, [e.source for e in share], decoding), [e.targets for e in share])
        summed = trainer.strategy.reduce(torch.tensor(astuple(counts), device=self.device), reduce_op="sum")
        totals = ErrorCounts(*summed.tolist())
        # The values agree on every rank (sync_dist: as for the loss).
        self.log("dev_wer", totals.wer, prog_bar=True, sync_dist=True)
        self.log("dev_per", totals.per, prog_bar=True, sync_dist=True)
        self.log("dev_sequence_accuracy", totals.sequence_accuracy, sync_dist=True)

    def on_train_epoch_start(self) -> None:
        sampler = self.trainer.train_dataloader.batch_sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.current_epoch)

    def _after_each_validation(self) -> dict[str, object]:
        """When Lightning steps the plateau schedule: right after each validation.

        Its patience then counts validations, as early stopping's does, so that the
        rate is cut before early stopping gives up. Lightning steps a "step" schedule
        once ``frequency`` batches of an epoch are done, just after it validates there.
        """
        interval = self.config.training.val_check_interval
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if interval > 1:
            return {"interval": "step", "frequency": int(interval)}
        if datamodule is None:  # no epoch length to go by: once an epoch
            return {"interval": "epoch"}
        batches = datamodule.epoch_batches(self.trainer.world_size)
        return {"interval": "step", "frequency": max(1, int(batches * interval))}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A run resumed from a checkpoint whose optimiser holds one group goes on as it started.

        Before weight decay spared the biases, it fell on every parameter, in one group.
        Lightning calls this before it builds the optimiser, into which it then loads the state.
        """
        optimizers = checkpoint.get("optimizer_states") or [{}]
        self.decays_every_parameter = len(optimizers[0].get("param_groups", ())) == 1

    def parameter_groups(self) -> list[dict]:
        """The optimiser's groups: weight decay on the weight matrices (embeddings included), none on the biases.

        Decaying an LSTM's forget-gate bias, set to 1 so that the cell keeps its memory from the
        start, would take that back. Without weight decay, one group, as checkpoints saved
        before the split hold; so too for a run they started (see on_load_checkpoint).
        """
        decay = self.config.training.weight_decay
        if not decay or self.decays_every_parameter:
            return [{"params": list(self.parameters()), "weight_decay": decay}]
        matrices = [p for p in self.parameters() if p.ndim >= 2]
        vectors = [p for p in self.parameters() if p.ndim < 2]
        return [{"params": matrices, "weight_decay": decay}, {"params": vectors, "weight_decay": 0.0}]

    def configure_optimizers(self):
        training = self.config.training
        optimizer_class = torch.optim.AdamW if training.optimizer == "adamw" else torch.optim.Adam
        optimizer = optimizer_class(self.parameter_groups(), lr=training.lr, weight_decay=0.0)
        if training.schedule == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=training.plateau_factor, patience=training.plateau_patience
            )
            return {
                "optimizer": optimizer,
                # Not strict: an epoch cut short by a budget may end before its first validation.
                "lr_scheduler": {
                    "scheduler": scheduler,
                    "monitor": training.monitor,
                    **self._after_each_validation(),
                    "strict": False,
                },
            }
        if training.schedule == "warmup":
            warmup = training.warmup_steps

            def factor(step: int) -> float:
                step = max(step, 1)
                return min(step / warmup, math.sqrt(warmup / step))

            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        if training.schedule == "cosine":
            # The factor reads the trainer, not the step count, so a time budget sets the horizon too.
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda _: 0.5 * (1.0 + math.cos(math.pi * self.budget_spent()))
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        return optimizer

    def budget_spent(self) -> float:
        """The share of the training budget used: the most spent of max_steps, max_epochs and max_time."""
        if self._trainer is None:
            return 0.0
        trainer = self.trainer
        shares = [0.0]
        if trainer.max_steps > 0:
            shares.append(trainer.global_step / trainer.max_steps)
        batches = trainer.num_training_batches
        if trainer.max_epochs and trainer.max_epochs > 0 and 0 < batches < math.inf:
            shares.append(trainer.global_step / (batches * trainer.max_epochs))
        for timer in (c for c in trainer.callbacks if isinstance(c, Timer)):
            remaining = timer.time_remaining()
            if remaining is not None:
                elapsed = timer.time_elapsed()
                shares.append(elapsed / max(elapsed + remaining, 1e-9))
        # Clocks differ between processes: every rank takes rank 0's share, so the rates agree.
        return min(1.0, trainer.strategy.broadcast(max(shares)))
