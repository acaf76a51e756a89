"""Token-level distillation: a teacher's next-token distributions over the training set, computed once.

Under teacher forcing the teacher reads each training pair as the student does,
so its distribution at every target position depends on the pair alone: one pass
over the training set before training serves every epoch, and the teacher does
not run during training. Each position keeps the teacher's ``top_k`` most
likely tokens, renormalised; for a vocabulary of phonemes or subwords the mass
beyond the first few is negligible. The table takes ``target positions (EOS
included) × top_k × 6`` bytes on the training device.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from genrnn.data import Batch, PairDataset, TokenBudgetBatchSampler, collate


class Distillation:
    """A frozen teacher, then its table of top-k distributions, and the student's loss against them.

    Held outside the LightningModule's parameters on purpose: it is neither trained
    nor checkpointed, and distributed training does not synchronise it. Every rank
    makes the whole table, since a batch names its pairs by their index in the
    whole training set.
    """

    def __init__(self, teacher: nn.Module, top_k: int = 8) -> None:
        self.teacher: nn.Module | None = teacher.eval().requires_grad_(False)
        self.top_k = top_k
        # Every pair's positions one after another: pair i's are rows start[i] … start[i] + length[i] - 1.
        self.start: torch.Tensor | None = None  # (pairs,)
        self.length: torch.Tensor | None = None  # (pairs,) target length + 1 (EOS)
        self.ids: torch.Tensor | None = None  # (positions, top_k) token ids
        self.probs: torch.Tensor | None = None  # (positions, top_k) their renormalised probabilities

    @torch.no_grad()
    def prepare(self, dataset: PairDataset, device: torch.device, max_tokens: int) -> float:
        """Run the teacher over every pair of ``dataset`` and keep its table on ``device``; the seconds it took."""
        started = time.monotonic()
        teacher = self.teacher.to(device)
        k = min(self.top_k, teacher.target_vocab_size)
        self.length = torch.tensor([len(t) + 1 for t in dataset.targets], device=device)
        self.start = self.length.cumsum(0) - self.length
        positions = int(self.length.sum())
        self.ids = torch.zeros(positions, k, dtype=torch.int32, device=device)
        self.probs = torch.zeros(positions, k, dtype=torch.float16, device=device)
        # Without gradients to keep, batches four times the training budget fit as well.
        costs = [dataset.cost(i) for i in range(len(dataset))]
        batches = TokenBudgetBatchSampler(costs, 4 * max_tokens, shuffle=False)
        for indices in batches:
            batch = collate([dataset[i] for i in indices]).to(device)
            logits = teacher(batch.source, batch.source_lengths, batch.target_in)
            top = logits.float().softmax(dim=-1).topk(k, dim=-1)
            rows, real = self._rows(batch.index, logits.shape[1])
            self.ids[rows[real]] = top.indices[real].int()
            self.probs[rows[real]] = (top.values / top.values.sum(dim=-1, keepdim=True))[real].half()
        teacher.cpu()  # its work is done: off the device, whoever else holds it
        self.teacher = None
        return time.monotonic() - started

    @property
    def table_bytes(self) -> int:
        """Device memory the table takes."""
        return sum(t.numel() * t.element_size() for t in (self.start, self.length, self.ids, self.probs))

    def _rows(self, pairs: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The table rows of the pairs' first ``steps`` positions ``(pairs, steps)``, and which are real."""
        offsets = torch.arange(steps, device=pairs.device)
        real = offsets[None] < self.length[pairs, None]
        return torch.where(real, self.start[pairs, None] + offsets[None], 0), real

    def loss(self, log_probs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean token cross-entropy of the student's ``log_probs`` with the teacher's distributions."""
        rows, real = self._rows(batch.index, log_probs.shape[1])
        picked = log_probs.gather(-1, self.ids[rows].long())
        soft = -(self.probs[rows].float() * picked).sum(dim=-1)
        return (soft * real).sum() / real.sum()  # masking by multiplying: a boolean index would wait for the GPU

    def __deepcopy__(self, memo: dict) -> Distillation:
        # Weight averaging copies the whole module; the frozen table can be shared.
        return self
