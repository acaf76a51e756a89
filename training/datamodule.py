"""The LightningDataModule: tokenised pairs in length-bucketed, token-budget batches."""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch

from genrnn.config import DataConfig
from genrnn.data import Example, PairDataset, TokenBudgetBatchSampler, collate, training_pairs
from genrnn.tokenizer import Tokenizer


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
    ) -> None:
        super().__init__()
        self.config = config
        self.seed = seed
        self.source_tokenizer = source_tokenizer
        self.target_tokenizer = target_tokenizer
        limits = (config.max_source_length, config.max_target_length)
        self.train_set = PairDataset(training_pairs(train_examples), source_tokenizer, target_tokenizer, *limits)
        self.dev_set = PairDataset(training_pairs(dev_examples), source_tokenizer, target_tokenizer)
        limit = config.valid_limit or len(dev_examples)
        self.dev_examples = list(dev_examples)[:limit]  # decoded for dev WER/PER at each validation

    def _loader(self, dataset: PairDataset, shuffle: bool) -> torch.utils.data.DataLoader:
        trainer = self.trainer
        sampler = TokenBudgetBatchSampler(
            [dataset.cost(i) for i in range(len(dataset))],
            max_tokens=self.config.max_tokens,
            max_items=self.config.batch_size,
            shuffle=shuffle,
            seed=self.seed,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
        )
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=self.config.num_workers,
            persistent_workers=self.config.num_workers > 0,
        )

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.dev_set, shuffle=False)
