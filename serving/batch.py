"""Batch generation jobs: decode every line of a file through Lightning's (distributed) predict.

The items are sorted by length and cut into batches; batch ``b`` belongs to rank
``b mod world_size``. Ownership depends only on the input and the number of ranks,
never on what is already done, so ranks need not agree on progress: each skips
its batches that the part files already hold whole and decodes the rest, a batch
cut short whole again (writing only its new items), so that a resumed job writes
what an unbroken one would. Rank 0 merges the parts in input order once every rank
is through.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
import warnings
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.accelerators import CPUAccelerator
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException
from torch.utils.data import DataLoader, Dataset

from genrnn.bundle import ensemble_members, load_bundle
from genrnn.config import (
    DEFAULT_AVERAGING,
    JOB_CAPS,
    Averaging,
    DecodingConfig,
    decoding_for_mode,
    is_rank_zero,
    parse_devices,
)
from genrnn.decoding import Generator
from genrnn.errors import ConfigurationError, first_sigterm_only, interruption_kept, sigterm_default
from genrnn.files import check_apart, check_writable, sha256
from genrnn.quantization import quantize_int8
from serving.batch_input import Item, ItemTable, scan_items
from serving.batch_parts import PartStore


@dataclass(frozen=True)
class GenerateJob:
    """Everything ``genrnn generate`` was asked to do."""

    model: str | Path  # a bundle directory, or several joined by commas (an ensemble)
    input: Path
    output: Path
    settings: DecodingConfig  # every decoding option, also those its mode does not read: lines may change mode
    batch_size: int = 256
    accelerator: str = "auto"
    devices: str = "1"  # an integer, "auto", or a list like "0,1"
    num_nodes: int = 1
    skip_bad_lines: bool = False
    quantize: str | None = None  # "int8": dynamic quantization for CPU decoding
    ensemble_averaging: Averaging = DEFAULT_AVERAGING


class OwnedBatches:
    """A rank's batches: slices of every item's position in the table, sorted by length, then by place in the
    input (8 bytes an item, held by each rank), and each batch's start; a batch's positions are listed when asked."""

    def __init__(self, ordered: torch.Tensor | None, starts: Sequence[int], size: int) -> None:  # None: no items
        self.ordered, self.starts, self.size = ordered, starts, size

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, number: int) -> list[int]:
        start = self.starts[number]
        return self.ordered[start : start + self.size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return (self[number] for number in range(len(self)))

    def pending(self, done: bytearray, index: array) -> OwnedBatches:
        """The batches that hold an item not done (``done[index[position]]`` is 0)."""
        kept = (start for number, start in enumerate(self.starts) if not all(done[index[p]] for p in self[number]))
        return OwnedBatches(self.ordered, array("q", kept), self.size)


def owned_batches(table: ItemTable, batch_size: int, rank: int, world_size: int) -> OwnedBatches:
    """The rank's share of the batches of all items sorted by length: each batch the items' positions in ``table``."""
    # A stable sort of the input-ordered items: by length, then by place in the input.
    ordered = torch.argsort(torch.frombuffer(table.length, dtype=torch.int32), stable=True) if len(table) else None
    return OwnedBatches(ordered, range(rank * batch_size, len(table), world_size * batch_size), batch_size)


class Progress:
    """Items/s and ETA on stderr, at most every few seconds; counts rank 0's work × the number of ranks."""

    def __init__(self, total: int, done: int, world_size: int, every: float = 2.0) -> None:
        self.total, self.done, self.world_size, self.every = total, done, world_size, every
        self.new = 0
        self.started = self.shown = time.monotonic()

    def advance(self, items: int, final: bool = False) -> None:
        self.new += items * self.world_size
        now = time.monotonic()
        if not final and now - self.shown < self.every:
            return
        self.shown = now
        done = min(self.done + self.new, self.total)
        rate = self.new / max(now - self.started, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "?"
        print(
            f"generate: {done}/{self.total} items ({done / self.total:.0%})  {rate:.1f} items/s  ETA {eta_text}",
            file=sys.stderr,
            flush=True,
        )


def out_of_memory(error: Exception) -> bool:
    """Whether ``error`` is an allocation that failed: a GPU's, or the CPU allocator's."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


class GenerationModule(pl.LightningModule):
    """Wraps the decoding engine for Lightning's predict: a batch of items in, output records out."""

    def __init__(self, generator: Generator, input: Path) -> None:
        super().__init__()
        self.generator = generator
        self.model = generator.model  # a submodule, so that Lightning places it on the rank's device
        self.input = input  # named in the message of an item that cannot be decoded

    def transfer_batch_to_device(self, batch: list[Item], device: Any, dataloader_idx: int) -> list[Item]:
        return batch  # plain Python items: the engine places its own tensors

    def predict_step(self, batch: list[Item], batch_idx: int) -> list[tuple[int, dict[str, Any]]]:
        return self._decode(batch)

    def _decode(self, batch: list[Item]) -> list[tuple[int, dict[str, Any]]]:
        """The batch's records; a batch that runs out of memory is decoded in halves, down to single items.

        An item that does not fit alone is recorded with its error, as a bad line is: otherwise
        every rerun of the job would stop at the same batch. Any other error stops the job.
        """
        generations = None
        try:
            generations = self.generator.generate([item.source for item in batch], [item.settings for item in batch])
        except Exception as error:
            if not out_of_memory(error):
                raise
        if generations is not None:
            return [
                (item.index, item.output([c.to_dict() for c in generation.candidates]))
                for item, generation in zip(batch, generations)
            ]
        # Out of the except block: its traceback held the failed batch's tensors until here.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(batch) == 1:
            item = batch[0]
            reason = "decoding ran out of memory, even alone"
            print(f"genrnn generate: {self.input}:{item.line}: {reason} (recorded)", file=sys.stderr)
            return [(item.index, item.failure(reason))]
        half = len(batch) // 2
        return self._decode(batch[:half]) + self._decode(batch[half:])


def _as_is(batch: list[Item]) -> list[Item]:
    return batch


class _TableBatches(Dataset):
    """Batches of items, each read from the input file when it is decoded."""

    def __init__(self, table: ItemTable, batches: OwnedBatches) -> None:
        self.table, self.batches = table, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, number: int) -> list[Item]:
        return self.table.items(self.batches[number])


class ItemBatches(pl.LightningDataModule):
    """The rank's pending batches: its own share, less the batches the part files already hold whole."""

    def __init__(self, table: ItemTable, store: PartStore, batch_size: int) -> None:
        super().__init__()
        self.table, self.store, self.batch_size = table, store, batch_size
        # A rank can have nothing to do: fewer batches than devices, or a resume whose share is done.
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def predict_dataloader(self) -> DataLoader:
        mine = owned_batches(self.table, self.batch_size, self.trainer.global_rank, self.trainer.world_size)
        # A batch that a kill cut short is decoded whole again, not re-cut with the next: the last
        # bits of a log-probability depend on what shares its batch, and a resumed job must write
        # what an unbroken one would. PartWriter keeps only the items not written before.
        pending = mine.pending(self.store.done(self.table.total), self.table.index)
        return DataLoader(_TableBatches(self.table, pending), batch_size=None, collate_fn=_as_is)


class PartWriter(BasePredictionWriter):
    """Appends each batch's records to the rank's part file as soon as it is decoded."""

    def __init__(self, store: PartStore, total: int, recorded: int) -> None:
        """``recorded``: the items done without decoding (bad lines), out of ``total``."""
        super().__init__(write_interval="batch")
        self.store, self.total, self.recorded = store, total, recorded
        self.part = None
        self.done = bytearray()  # done[index]: the item was in a part when the run started
        self.progress: Progress | None = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        first_sigterm_only()
        self.part = self.store.open_part(trainer.global_rank)
        self.done = self.store.done(self.total)
        if trainer.is_global_zero:
            self.progress = Progress(self.total, self.recorded + self.done.count(1), trainer.world_size)

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: list[tuple[int, dict[str, Any]]],
        batch_indices: Any,
        batch: list[Item],
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        new = [(index, record) for index, record in prediction if not self.done[index]]
        self.store.write(self.part, new)
        if self.progress:
            self.progress.advance(len(new))
        if trainer.received_sigterm:  # Lightning's prediction loop never looks: stop once the batch is saved
            raise SIGTERMException

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.part.close()
        if self.progress:
            self.progress.advance(0, final=True)


def _quiet_lightning() -> None:
    """Keep Lightning's start-up chatter (devices, TPU/HPU lines, tips) off the job's output."""
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="pytorch_lightning")


def build_trainer(job: GenerateJob, writer: PartWriter) -> pl.Trainer:
    """A Trainer for predict on the job's devices; a device setting Lightning rejects is a user's error."""
    try:
        return pl.Trainer(
            accelerator=job.accelerator,
            devices=parse_devices(job.devices),
            num_nodes=job.num_nodes,
            strategy="auto",  # DDP as soon as there are several devices or nodes
            callbacks=[writer],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,  # Progress reports items/s, which Lightning's bar (batches/s) does not
            enable_model_summary=False,
            use_distributed_sampler=False,  # ItemBatches shards by rank itself
        )
    except (MisconfigurationException, TypeError, ValueError, ImportError) as error:
        # ImportError: an accelerator whose package is missing (tpu without torch_xla)
        raise ConfigurationError(f"accelerator/devices/num_nodes: {error}") from None


def _earlier_stamp(job: GenerateJob, fingerprint: str, model_fingerprint: str) -> dict[str, Any] | None:
    """The job's stamp as genrnn wrote it before stamps named the items read, if it decoded the same items.

    That version stamped the file's bytes and the settings the job's mode reads, and gave a
    line in another mode none of the job's other options: where that made other items, its
    parts are not this job's.
    """
    settings = decoding_for_mode(asdict(job.settings))
    if scan_items(job.input, settings, job.skip_bad_lines).fingerprint != fingerprint:
        return None
    return {
        "input_sha256": sha256(job.input),
        "model_sha256": model_fingerprint,
        "settings": asdict(settings),
        "quantize": job.quantize,
    }


def run_generate(job: GenerateJob) -> None:
    """Decode the input file into the output file, resuming from its part files if a run was cut short."""
    if job.batch_size < 1:
        raise ConfigurationError(f"batch_size: must be at least 1; got {job.batch_size}")
    if job.output.is_dir():
        raise ConfigurationError(f"output: {job.output} is a directory; name the JSONL file to write")
    if job.output.exists() and not job.output.is_file():  # /dev/stdout: it would be taken for a finished job's
        raise ConfigurationError(f"output: {job.output} is not a regular file; the output is written whole at the end")
    # The input and the model are read first, so that a finished job's rerun tells a mistyped one.
    table = scan_items(job.input, job.settings, job.skip_bad_lines)
    check_apart(job.output, [job.input, *ensemble_members(job.model)])
    bad_lines = table.bad_lines
    bundle = load_bundle(job.model, averaging=job.ensemble_averaging)
    store = PartStore(job.output)
    if store.merged():  # a kill during the last cleanup: the output is whole
        shutil.rmtree(store.directory, ignore_errors=True)
    stamp = {"items_sha256": table.fingerprint, "model_sha256": bundle.fingerprint, "quantize": job.quantize}
    if job.output.exists() and not store.directory.exists():
        if store.made_by_another_job(stamp):
            raise ConfigurationError(
                f"output: {job.output} holds the outputs of another job (its input, model or decoding settings "
                "differ); remove it, or name another output"
            )
        print(f"genrnn generate: {job.output} exists: nothing to do (remove it to generate again)", file=sys.stderr)
        return
    check_writable(job.output)  # not before: a finished job's output may be read-only
    for bad in bad_lines if is_rank_zero() else ():  # every rank reads the same lines
        print(f"genrnn generate: {job.input}:{bad.line}: {bad.error} (recorded, skipped)", file=sys.stderr)
    _quiet_lightning()
    trainer = build_trainer(job, PartWriter(store, table.total, recorded=len(bad_lines)))
    model = bundle.model
    if job.quantize == "int8":
        if not isinstance(trainer.accelerator, CPUAccelerator):
            raise ConfigurationError("quantize: int8 decoding runs on the CPU; add --accelerator cpu")
        model = quantize_int8(model)
    store.check_stamp(
        stamp,
        earlier=partial(_earlier_stamp, job, table.fingerprint, bundle.fingerprint),
    )

    generator = Generator(
        model, bundle.source_tokenizer, bundle.target_tokenizer, max_new_tokens_cap=JOB_CAPS["max_new_tokens"]
    )
    with interruption_kept(trainer):
        module, batches = GenerationModule(generator, job.input), ItemBatches(table, store, job.batch_size)
        trainer.predict(module, datamodule=batches, return_predictions=False)
    with sigterm_default():  # the other ranks may take long, or be stuck
        trainer.strategy.barrier("merge")  # every rank's part is complete before rank 0 reads them
    if trainer.is_global_zero:
        store.merge(table.total, {bad.index: bad.output() for bad in bad_lines})
        print(f"genrnn generate: {table.total} items written to {job.output}", file=sys.stderr)
