"""Token-level distillation: a teacher's next-token distributions over the training set, computed once.

Under teacher forcing the teacher reads each training pair as the student does,
so its distribution at every target position depends on the pair alone: one pass
over the training set before training serves every epoch, and the teacher does
not run during training. Each position keeps the teacher's ``top_k`` most
likely tokens, renormalised; for a vocabulary of phonemes or subwords the mass
beyond the first few is negligible. The table takes ``target positions (EOS
included) × top_k × 6`` bytes on the training device.

A distilled run saves its table in ``teacher-table/``, with the tokenizers it was
made with; naming that directory as ``training.teacher`` teaches another run on the
same data without running the teacher again (another seed, size or budget, on
another machine), since only the table, not the teacher, travels.

```
teacher-table.json  format version, the teacher's and the data's fingerprints, sha256 of every other file
table.safetensors   each pair's length, then every position's top_k token ids and probabilities
source.model        the tokenizers: the student's must be the teacher's
target.model
```
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from genrnn.bundle import SOURCE_MODEL, TARGET_MODEL, Bundle
from genrnn.config import DataConfig, TokenizerConfig, from_dict, to_dict
from genrnn.data import Batch, PairDataset, TokenBudgetBatchSampler, collate
from genrnn.errors import BundleError, ConfigurationError
from genrnn.files import read_manifest, sha256, with_usual_permissions, write_manifest
from genrnn.tokenizer import Tokenizer, tokenizers_fingerprint

TABLE_FORMAT_VERSION = 1
TABLE_MANIFEST = "teacher-table.json"
TABLE_WEIGHTS = "table.safetensors"
TABLE_LIMITS = ("max_source_length", "max_target_length")  # the data settings that choose the training pairs


class Distillation:
    """A frozen teacher, then its table of top-k distributions, and the student's loss against them.

    Held outside the LightningModule's parameters on purpose: it is neither trained
    nor checkpointed, and distributed training does not synchronise it. Every rank
    makes the whole table, since a batch names its pairs by their index in the
    whole training set.
    """

    def __init__(self, teacher: nn.Module | None, top_k: int = 8) -> None:
        """From a teacher, or from nothing, for a saved table to fill (see :meth:`TeacherTable.distillation`)."""
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.top_k = top_k
        self.on_made: Callable[[Distillation], None] | None = None  # on rank 0, once the teacher has made the table
        # Every pair's positions one after another: pair i's are rows start[i] … start[i] + length[i] - 1.
        self.start: torch.Tensor | None = None  # (pairs,)
        self.length: torch.Tensor | None = None  # (pairs,) target length + 1 (EOS)
        self.ids: torch.Tensor | None = None  # (positions, top_k) token ids
        self.probs: torch.Tensor | None = None  # (positions, top_k) their renormalised probabilities

    @torch.no_grad()
    def prepare(self, dataset: PairDataset, device: torch.device, max_tokens: int) -> float | None:
        """Have the table on ``device``, the teacher run over every pair of ``dataset`` if it has not.

        Returns the seconds the teacher took; ``None`` when the table was there already.
        """
        if self.teacher is None:
            self.start, self.length, self.ids, self.probs = (
                t.to(device) for t in (self.start, self.length, self.ids, self.probs)
            )
            return None
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


def save_table(
    directory: Path,
    distillation: Distillation,
    source_tokenizer: Tokenizer,
    target_tokenizer: Tokenizer,
    facts: dict[str, Any],
) -> Path:
    """Write the table a teacher made, with the tokenizers and ``facts`` (teacher, data); the manifest last."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / TABLE_MANIFEST).unlink(missing_ok=True)
    vocab = target_tokenizer.vocab_size
    narrowest = torch.uint8 if vocab <= 256 else torch.int16 if vocab <= 2**15 else torch.int32
    tensors = {
        "length": distillation.length.int(),
        "ids": distillation.ids.to(narrowest),  # one byte a token id for a phoneme vocabulary, not four
        "probs": distillation.probs,
    }
    save_file({name: t.cpu().contiguous() for name, t in tensors.items()}, str(directory / TABLE_WEIGHTS))
    with_usual_permissions(directory / TABLE_WEIGHTS)
    source_tokenizer.save(directory / SOURCE_MODEL)
    target_tokenizer.save(directory / TARGET_MODEL)
    manifest = {
        "format_version": TABLE_FORMAT_VERSION,
        **facts,
        "pairs": len(distillation.length),
        "top_k": distillation.ids.shape[1],
        "files": {f: sha256(directory / f) for f in (TABLE_WEIGHTS, SOURCE_MODEL, TARGET_MODEL)},
    }
    write_manifest(directory / TABLE_MANIFEST, manifest)
    return directory


def is_teacher_table(path: str | Path) -> bool:
    """Whether ``path`` is a directory that :func:`save_table` wrote."""
    return (Path(path) / TABLE_MANIFEST).is_file()


@dataclass
class TeacherTable:
    """A saved table: it teaches as its teacher did, and lends the run its tokenizers as a teacher bundle would."""

    directory: Path
    source_tokenizer: Tokenizer
    target_tokenizer: Tokenizer
    tokenizer_config: TokenizerConfig
    manifest: dict[str, Any]

    @classmethod
    def load(cls, directory: str | Path) -> TeacherTable:
        """Load and verify a table directory."""
        directory = Path(directory)
        path = directory / TABLE_MANIFEST
        required = {TABLE_WEIGHTS, SOURCE_MODEL, TARGET_MODEL}
        manifest = read_manifest(path, "teacher table", TABLE_FORMAT_VERSION, required)
        missing = {"teacher", "data", "pairs", "top_k", "tokenizer", *TABLE_LIMITS} - set(manifest)
        if missing:
            raise BundleError(f"{path} lacks {', '.join(sorted(missing))}: not a teacher table's manifest")
        try:
            tokenizer_config = from_dict(TokenizerConfig, manifest["tokenizer"], prefix="tokenizer")
        except ConfigurationError as error:
            raise BundleError(f"{path}: bad configuration: {error}") from None
        source, target = Tokenizer.load(directory / SOURCE_MODEL), Tokenizer.load(directory / TARGET_MODEL)
        return cls(directory, source, target, tokenizer_config, manifest)

    @property
    def fingerprint(self) -> str:
        """The teacher's: a run resumes with the table of the teacher it started with."""
        return self.manifest["teacher"]

    @property
    def tokenizers_fingerprint(self) -> str:
        return tokenizers_fingerprint(self.source_tokenizer, self.target_tokenizer)

    def ancestry(self) -> list[dict[str, Any]] | None:
        """The teachers' :meth:`genrnn.bundle.Bundle.ancestry`; ``None`` for a table made before tables recorded it."""
        return self.manifest.get("ancestry")

    def check(self, data_fingerprint: str, data: DataConfig, dataset: PairDataset) -> None:
        """Refuse a run whose training pairs are not the ones the table was made for, position for position."""
        made_for = self.manifest
        limits = {key: getattr(data, key) for key in TABLE_LIMITS}
        problem = None
        if made_for["data"] != data_fingerprint:
            problem = "other training data"
        elif {key: made_for[key] for key in limits} != limits:
            problem = f"other length limits ({', '.join(f'data.{k}={made_for[k]}' for k in limits)})"
        elif made_for["pairs"] != len(dataset):
            problem = f"{made_for['pairs']} training pairs, and this run has {len(dataset)}"
        elif not torch.equal(self._tensors["length"].long(), torch.tensor([len(t) + 1 for t in dataset.targets])):
            problem = "targets of other lengths: the tokenizers encode otherwise here"
        if problem:
            raise ConfigurationError(f"training.teacher: {self.directory} holds a table made for {problem}")

    @cached_property
    def _tensors(self) -> dict[str, torch.Tensor]:
        """The table's tensors, read once for the check and the run."""
        return load_file(str(self.directory / TABLE_WEIGHTS))

    def distillation(self) -> Distillation:
        """The table, on the CPU until the run places it."""
        tensors = self._tensors
        distillation = Distillation(None, top_k=self.manifest["top_k"])
        distillation.length = tensors["length"].long()
        distillation.start = distillation.length.cumsum(0) - distillation.length
        distillation.ids = tensors["ids"].int()
        distillation.probs = tensors["probs"]
        return distillation


def table_facts(teacher: Bundle, data_fingerprint: str, data: DataConfig, tokenizer: TokenizerConfig) -> dict:
    """What a saved table records of how it was made: the teacher, the training pairs, the tokenizers' settings."""
    return {
        "teacher": teacher.fingerprint,
        "ancestry": teacher.ancestry(),
        "data": data_fingerprint,
        **{key: getattr(data, key) for key in TABLE_LIMITS},
        "tokenizer": to_dict(tokenizer),
    }
