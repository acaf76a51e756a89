"""The LightningDataModule: tokenised pairs in length-bucketed, token-budget batches."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Sequence
from functools import partial

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.seed import pl_worker_init_function

from genrnn.config import DataConfig
from genrnn.data import SHUFFLE_SEEDING, Batch, Example, PairDataset, TokenBudgetBatchSampler, collate, training_pairs
from genrnn.tokenizer import Tokenizer


class ResumableLoader(torch.utils.data.DataLoader):
    """A training loader whose place in the epoch goes into checkpoints.

    Lightning saves ``state_dict()`` with every checkpoint and hands it back to
    ``load_state_dict()`` before the resumed run draws its first batch, so a run
    killed mid-epoch goes on with the first batch it had not yet served: none is
    repeated or skipped. Counting happens where batches leave the loader, which is
    exact whatever the workers have fetched ahead.
    """

    batch_sampler: TokenBudgetBatchSampler

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0

    def __iter__(self) -> Iterator[Batch]:
        self._served = self.batch_sampler.skipped_next_pass()
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.batch_sampler.epoch, "served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.resume(state["epoch"], state["served"])


def deaf_to_sigterm(worker_id: int, rank: int) -> None:
    """Start a loader worker that ignores SIGTERM, seeded as Lightning seeds workers.

    A SIGTERM to the whole process group (systemd, a batch scheduler) is the training
    process's to answer: it saves, then stops, and its workers with it. A worker that
    died of it first failed the run. Lightning adds its seeding function only to loaders
    without one, so this one calls it.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id, rank=rank)


def spread(examples: Sequence[Example], limit: int) -> list[Example]:
    """``limit`` examples evenly spaced through ``examples`` (all of them for 0): dev files are
    often sorted, and their first examples alone would be words of a few initial letters."""
    if not limit or limit >= len(examples):
        return list(examples)
    return [examples[i * len(examples) // limit] for i in range(limit)]


class PairDataModule(pl.LightningDataModule):
    """Training and dev loaders over examples that are already read and tokenisers already trained."""

    def __init__(
        self,
        train_examples: Sequence[Example],
        dev_examples: Sequence[Example],
        source_tokenizer: Tokenizer,
        target_tokenizer: Tokenizer,
        config: DataConfig,
        seed: int = 0,
        seeding: str = SHUFFLE_SEEDING,
    ) -> None:
        super().__init__()
        self.config = config
        self.seed = seed
        self.seeding = seeding  # of each epoch's shuffle (see genrnn.data.SHUFFLE_SEEDING)
        self.source_tokenizer = source_tokenizer
        self.target_tokenizer = target_tokenizer
        limits = (config.max_source_length, config.max_target_length)
        self.train_set = PairDataset(training_pairs(train_examples), source_tokenizer, target_tokenizer, *limits)
        self.dev_set = PairDataset(training_pairs(dev_examples), source_tokenizer, target_tokenizer)
        self.dev_examples = spread(dev_examples, config.valid_limit)  # decoded for dev WER/PER at each validation

    def _loader(self, dataset: PairDataset, shuffle: bool) -> torch.utils.data.DataLoader:
        """Training batches come from a :class:`ResumableLoader`; dev batches, in a fixed order, need not."""
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        sampler = self._sampler(dataset, shuffle, world_size, rank)
        loader = ResumableLoader if shuffle else torch.utils.data.DataLoader
        return loader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=self.config.num_workers,
            persistent_workers=self.config.num_workers > 0,
            worker_init_fn=partial(deaf_to_sigterm, rank=trainer.global_rank if trainer else 0),
            # Each pass draws its workers' seed from this generator. From torch's global one, a run
            # resumed mid-epoch would draw once more than an unbroken run, and its dropout would differ.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _sampler(self, dataset: PairDataset, shuffle: bool, world_size: int, rank: int) -> TokenBudgetBatchSampler:
        """Batches of ``dataset`` within the token budget, this rank's share of them."""
        costs = [dataset.cost(i) for i in range(len(dataset))]
        return TokenBudgetBatchSampler(
            costs,
            max_tokens=self.config.max_tokens,
            max_items=self.config.batch_size,
            shuffle=shuffle,
            seed=self.seed,
            seeding=self.seeding,
            num_replicas=world_size,
            rank=rank,
            even=shuffle,  # training steps on every rank together; the dev loss counts each pair once
        )

    def epoch_batches(self, world_size: int) -> int:
        """Training batches in an epoch of each of ``world_size`` processes."""
        return len(self._sampler(self.train_set, shuffle=True, world_size=world_size, rank=0))

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.dev_set, shuffle=False)
