"""The training entry point: data → tokenizers → Lightning fit → bundle of the best checkpoint."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.accelerators import CPUAccelerator
from pytorch_lightning.callbacks import LearningRateMonitor, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn

from genrnn.bundle import Bundle, ensemble_members, load_bundle, save_bundle
from genrnn.config import ExperimentConfig, ModelConfig, from_dict, is_rank_zero, parse_devices, to_dict
from genrnn.data import (
    BUILTIN_CMUDICT,
    DEV_SHARE,
    SHUFFLE_SEEDING,
    SHUFFLE_SEEDINGS,
    SUM_SHUFFLE_SEEDING,
    Example,
    builtin_split,
    default_valid_spec,
    examples_fingerprint,
    hold_out_dev,
    read_examples,
    training_pairs,
)
from genrnn.errors import BundleError, ConfigurationError, DataError, interruption_kept
from genrnn.files import check_apart, write_atomically
from genrnn.tokenizer import Tokenizer, train_tokenizers
from training.averaging import DeviceEMA
from training.datamodule import PairDataModule
from training.distillation import (
    TABLE_MANIFEST,
    Distillation,
    TeacherTable,
    is_teacher_table,
    save_table,
    table_facts,
)
from training.module import Seq2SeqModule
from training.paths import last_checkpoint, teacher_table
from training.resume import BestCheckpoint, CheckpointBeside, ResumePoint, StopsForGood, check_resumable

LOG_EVERY_N_STEPS = 20


def load_data(config: ExperimentConfig) -> tuple[list[Example], list[Example]]:
    """Training and dev examples as the config names them."""
    train = read_examples(config.data.train)
    valid_spec = config.data.valid or default_valid_spec(config.data.train)
    if valid_spec is None:
        train, dev = hold_out_dev(train)
        if not dev or not train:
            raise DataError(
                f"{config.data.train}: too few sources to hold out a dev set (about 1 in {DEV_SHARE}) "
                "and keep some to train on; give one with --valid"
            )
        if is_rank_zero():  # new training data gets its own dev set, whatever data.valid said: say so
            print(f"dev set: {len(dev)} examples held out of {config.data.train} (--valid gives one instead)")
        return train, dev
    split = builtin_split(config.data.train)
    if split is not None and split == builtin_split(valid_spec):
        if config.data.valid is None:  # the default dev set, which the user did not name
            raise ConfigurationError(
                f"data.train: {config.data.train} is the split that validates training on the built-in "
                f"dictionary; train on {BUILTIN_CMUDICT}, or give --valid a dev file"
            )
        others = "a file" if split == "dev" else f"{BUILTIN_CMUDICT}:dev, or a file"
        raise ConfigurationError(
            f"data.valid: {valid_spec} is the training data's own split ({config.data.train}); "
            f"validate on another ({others})"
        )
    dev = read_examples(valid_spec)
    shared = {e.source for e in train} & {e.source for e in dev}
    if shared and is_rank_zero():  # dev WER would flatter the model on them
        print(f"warning: {len(shared)} of the {len(dev)} dev sources are also training sources")
    return train, dev


def prepare_tokenizers(
    train: Sequence[Example], config: ExperimentConfig, directory: Path, data_fingerprint: str
) -> tuple[Tokenizer, Tokenizer]:
    """Tokenizers trained on the training pairs, or the ones an earlier run on the same data left."""
    source_path, target_path = directory / "source.model", directory / "target.model"
    stamp_path = directory / "fingerprint.json"
    stamp = {"data": data_fingerprint, "tokenizer": to_dict(config.tokenizer)}
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return Tokenizer.load(source_path), Tokenizer.load(target_path)
    pairs = training_pairs(train)
    source, target = train_tokenizers([s for s, _ in pairs], [t for _, t in pairs], config.tokenizer)
    directory.mkdir(parents=True, exist_ok=True)
    # Written whole or not at all: under torchrun every rank trains (identical) tokenizers at once.
    for path, content in (
        (source_path, source.model_proto),
        (target_path, target.model_proto),
        (stamp_path, json.dumps(stamp).encode()),
    ):
        write_atomically(path, content)
    return source, target


def _differences(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    """Where two settings differ, key by key, nested keys dotted: ``batches.max_tokens: 6000 (this run: 512)``.

    A fingerprint is told as ``data: changed`` (or added, or dropped).
    """

    def flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        items: dict[str, Any] = {}
        for key, value in values.items():
            items.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return items

    old, new = flat(found), flat(wanted)
    keys = [*new, *(key for key in old if key not in new)]  # a teacher dropped is a difference too
    shown = []
    for key in (key for key in keys if old.get(key) != new.get(key)):
        before, after = old.get(key), new.get(key)
        if _is_digest(before) or _is_digest(after):
            shown.append(f"{key}: {'added' if before is None else 'dropped' if after is None else 'changed'}")
        else:
            shown.append(f"{key}: {before!r} (this run: {after!r})")
    return ", ".join(shown)


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


DROPOUTS = ("embedding_dropout", "layer_dropout", "output_dropout")  # model settings that shape no weight


def load_related_bundles(config: ExperimentConfig) -> dict[str, Bundle | TeacherTable]:
    """The bundles that ``training.init_from`` and ``training.teacher`` name (the teacher may be a saved table).

    They lend the run their tokenizers (a student must share its teacher's
    vocabulary), so their tokenizer settings must be the run's, and their tokenizers
    one another's; the bundle that starts the model must have the run's model
    settings, but for dropout.
    """
    named = {key: getattr(config.training, key) for key in ("init_from", "teacher")}
    bundles = {}
    for key, path in named.items():
        if not path:
            continue
        try:
            if key == "teacher" and is_teacher_table(path):
                bundles[key] = bundle = TeacherTable.load(path)
            else:
                # Several teachers teach their mixture: the mean of their probabilities.
                bundles[key] = bundle = load_bundle(path, averaging="probabilities")
        except BundleError as error:
            raise ConfigurationError(f"training.{key}: {error}") from None
        if bundle.tokenizer_config != config.tokenizer:
            raise ConfigurationError(
                f"training.{key}: {path} has other tokenizer settings than this run: "
                + _differences(to_dict(bundle.tokenizer_config), to_dict(config.tokenizer))
            )
    if "init_from" in bundles:
        dropouts = {name: getattr(config.model, name) for name in DROPOUTS}
        found = dataclasses.replace(bundles["init_from"].model_config, **dropouts)
        if found != config.model:
            raise ConfigurationError(
                f"training.init_from: {named['init_from']} has other model settings than this run: "
                + _differences(to_dict(found), to_dict(config.model))
            )
    if len({bundle.tokenizers_fingerprint for bundle in bundles.values()}) > 1:
        raise ConfigurationError(
            f"training.init_from ({named['init_from']}) and training.teacher ({named['teacher']}) "
            "have different tokenizers; a student must share its teacher's"
        )
    return bundles


def related_ancestry(related: dict[str, Bundle | TeacherTable]) -> list[dict[str, Any]] | None:
    """The training data of the models that start or teach a run, and of theirs; ``None`` where one is unknown."""
    found = []
    for bundle in related.values():
        ancestry = bundle.ancestry()
        if ancestry is None:
            return None
        found += [entry for entry in ancestry if entry not in found]
    return found


def kept_table(directory: Path, facts: dict) -> TeacherTable | None:
    """The table in ``directory`` if it was made as ``facts`` say (teacher, data, settings) and is whole."""
    if not is_teacher_table(directory):
        return None
    try:
        manifest = json.loads((directory / TABLE_MANIFEST).read_text())
        if not isinstance(manifest, dict) or {key: manifest.get(key) for key in facts} != json.loads(json.dumps(facts)):
            return None
        return TeacherTable.load(directory)
    except (ValueError, OSError, BundleError):
        return None


def keep_table(
    directory: Path, distillation: Distillation, tokenizers: tuple[Tokenizer, Tokenizer], facts: dict
) -> None:
    """Write the table a teacher has just made, unless it is there already.

    A table of another teacher or data is replaced: a run killed before its first checkpoint
    may be run again with another teacher, which it resumes nothing of.
    """
    if kept_table(directory, facts) is not None:
        return
    shutil.rmtree(directory, ignore_errors=True)
    save_table(directory, distillation, *tokenizers, facts)
    size = sum(f.stat().st_size for f in directory.iterdir()) / 2**20
    print(f"teacher's table written to {directory} ({size:.0f} MiB): training.teacher={directory} teaches another run")


def build_module(
    config: ExperimentConfig, related: dict[str, Bundle | TeacherTable], vocab_sizes: tuple[int, int]
) -> Seq2SeqModule:
    """The module to train: started at ``init_from``'s weights and taught by ``teacher``, where those are set."""
    try:
        module = Seq2SeqModule.from_config(config, *vocab_sizes)
    except RuntimeError as error:  # memory for the weights, which the sizes alone cannot promise
        raise ConfigurationError(f"model: cannot be built with these sizes: {error}") from None
    if "init_from" in related:
        module.model.load_state_dict(related["init_from"].model.state_dict())
    teacher = related.get("teacher")
    if isinstance(teacher, TeacherTable):
        module.distillation = teacher.distillation()
    elif teacher is not None:
        module.distillation = Distillation(teacher.model)
    return module


# Recorded since after the first runs were stamped: a stamp without them resumes as before.
LATER_STAMP_KEYS = ("batches", "optimization", "validation", "distill_weight", "init_from")

# The settings that the optimiser's and the schedule's saved state, and the loss, depend on.
# The budget (max_steps, max_epochs, max_time) may change: a finished run may go on.
OPTIMIZATION_KEYS = (
    "optimizer",
    "lr",
    "weight_decay",
    "schedule",
    "warmup_steps",
    "plateau_factor",
    "plateau_patience",
    "label_smoothing",
    "gradient_clip",
    "ema_decay",
)


def stamp_run(
    output: Path,
    config: ExperimentConfig,
    data_fingerprint: str,
    related: dict[str, Bundle | TeacherTable],
    resuming: bool,
    dev_fingerprint: str,
) -> str:
    """Record what the run trains on; refuse to resume checkpoints of other data, model, tokenizers or teacher.

    The batches and the seed are recorded too: a resumed run skips the batches its checkpoint
    says were served, which are other batches under another token budget or seed. So is how
    the run is validated: its best score, early stopping and schedule compare scores on one
    dev set, decoded and measured one way.

    Returns how the run seeds each epoch's shuffle: as it began.
    """
    stamp = {"data": data_fingerprint, "model": to_dict(config.model), "tokenizer": to_dict(config.tokenizer)}
    data = config.data
    stamp["batches"] = {
        "max_tokens": data.max_tokens,
        "batch_size": data.batch_size,
        "max_source_length": data.max_source_length,
        "max_target_length": data.max_target_length,
        "seed": config.training.seed,
        "seeding": SHUFFLE_SEEDING,
    }
    stamp["optimization"] = {key: getattr(config.training, key) for key in OPTIMIZATION_KEYS}
    stamp["validation"] = {
        "dev": dev_fingerprint,
        "valid_limit": data.valid_limit,
        "monitor": config.training.monitor,
        "decoding": to_dict(config.decoding),
    }
    # Only when set, so that run directories from before these keys existed still resume.
    if related:
        stamp["tokenizers_from_bundle"] = next(iter(related.values())).tokenizers_fingerprint
    # The weights it began from, the bundle's record of where they came from: null too, so that a
    # stamp without the key is one from before it, not a run that began from no bundle.
    stamp["init_from"] = related["init_from"].fingerprint if "init_from" in related else None
    if "teacher" in related:
        stamp["teacher"] = related["teacher"].fingerprint
        stamp["distill_weight"] = config.training.distill_weight  # the loss: read only with a teacher
    path = output / "run.json"
    if resuming and path.is_file() and last_checkpoint(output).is_file():
        try:
            stored = json.loads(path.read_text())
            # Model settings added since the stamp was written take their defaults, which keep the old behaviour.
            stored["model"] = to_dict(from_dict(ModelConfig, stored["model"], "model"))
            # The run keeps the shuffle's seeding it began with: the sum, if stamped before it was recorded.
            seeding = stored.get("batches", {}).get("seeding", SUM_SHUFFLE_SEEDING)
            if seeding not in SHUFFLE_SEEDINGS:
                raise ValueError(seeding)
        except (ValueError, KeyError, TypeError, AttributeError, ConfigurationError):
            raise ConfigurationError(
                f"{path} is damaged, so the run there cannot be checked before it resumes; "
                "use another --output, or --no-resume to start afresh there"
            ) from None
        stamp["batches"]["seeding"] = seeding
        if "batches" in stored:
            stored["batches"]["seeding"] = seeding
        wanted = {key: value for key, value in stamp.items() if key in stored or key not in LATER_STAMP_KEYS}
        if stored != wanted:
            raise ConfigurationError(
                f"{output} holds a run with other settings ({_differences(stored, wanted)}; data, model, tokenizer, "
                "init_from, teacher, batching, seed, optimisation and validation must stay as the run began); use "
                "another --output, --no-resume to start afresh there, or training.init_from=BUNDLE to go on from "
                "its weights with new settings"
            )
    output.mkdir(parents=True, exist_ok=True)
    # Written whole or not at all: a kill while writing would leave a run that cannot resume.
    write_atomically(path, json.dumps(stamp))
    return stamp["batches"]["seeding"]


class EpochProgressBar(TQDMProgressBar):
    """Lightning's progress bar, which names the epoch and its length also where a run resumes within one.

    Lightning does not start again an epoch that it resumes within, and the bar, set up as
    an epoch starts, read ``Training: 117/?`` until the next.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.fit_loop.restarted_mid_epoch:
            self.on_train_epoch_start(trainer, pl_module)


def progress_bar(accelerator: str) -> TQDMProgressBar:
    """The progress bar; on a GPU it refreshes with the logs, as each refresh waits for the device.

    A refresh reads the logged loss back from the GPU, so a refresh every step made every
    step wait for the GPU to finish it.
    """
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return EpochProgressBar(refresh_rate=LOG_EVERY_N_STEPS if on_gpu else 1)


def build_trainer(config: ExperimentConfig, output: Path) -> tuple[pl.Trainer, BestCheckpoint]:
    """A Trainer with checkpoints on the dev metric, early stopping, and CSV + TensorBoard logs."""
    training = config.training
    checkpoint = BestCheckpoint(
        dirpath=output / "checkpoints",
        filename="best-{epoch}-{step}",
        monitor=training.monitor,
        mode="min",
        save_top_k=1,
        # The best checkpoint only feeds the bundle, and weights alone are a third of a checkpoint
        # with Adam's moments. Averaging puts its weights in only through a full checkpoint.
        save_weights_only=not training.ema_decay,
    )
    # Checked after each validation only: a budget may end an epoch before any validation ran.
    early_stopping = StopsForGood(
        monitor=training.monitor,
        mode="min",
        patience=training.early_stopping_patience,
        check_on_train_epoch_end=False,
    )
    resume_point = ResumePoint(last_checkpoint(output), training.checkpoint_minutes)
    callbacks = [
        checkpoint,
        resume_point,
        early_stopping,
        LearningRateMonitor(logging_interval="step"),
        progress_bar(training.accelerator),
    ]
    if training.ema_decay:
        # Validation, checkpoints and hence the bundle see the averaged weights.
        callbacks.append(DeviceEMA(decay=training.ema_decay))
    interval = training.val_check_interval
    try:
        trainer = pl.Trainer(
            accelerator=training.accelerator,
            devices=parse_devices(training.devices),
            num_nodes=training.num_nodes,
            strategy=training.strategy,
            precision=training.precision,
            max_epochs=training.max_epochs,
            max_steps=training.max_steps,
            max_time=training.max_time,
            gradient_clip_val=training.gradient_clip or None,
            val_check_interval=int(interval) if interval > 1 else interval,
            callbacks=callbacks,
            logger=[CSVLogger(output, name="logs"), TensorBoardLogger(output, name="tensorboard")],
            log_every_n_steps=LOG_EVERY_N_STEPS,
            use_distributed_sampler=False,  # the token-budget batch sampler shards by rank itself
            num_sanity_val_steps=0,
            plugins=[CheckpointBeside()],
        )
    except (MisconfigurationException, ValueError, TypeError, ImportError) as error:
        # Chained: a bug of ours would show its traceback. TypeError: a device count Lightning
        # refuses for the accelerator; ImportError: an accelerator whose package is missing.
        raise ConfigurationError(f"training.accelerator/devices/num_nodes/strategy/precision: {error}") from error
    if isinstance(trainer.accelerator, CPUAccelerator):
        # Lightning accepts both, and the recurrent kernel fails at the first step, in a traceback.
        if training.precision.startswith("16"):
            raise ConfigurationError(f"training.precision: {training.precision} needs a GPU; on a CPU use 32-true")
        if training.precision.startswith("bf16") and not cpu_runs_recurrent_at(training.precision, config.model.cell):
            raise ConfigurationError(
                f"training.precision: this CPU's {config.model.cell.upper()} kernel cannot run {training.precision} "
                "(it lacks bfloat16 instructions); use 32-true"
            )
    return trainer, checkpoint


def cpu_runs_recurrent_at(precision: str, cell: str) -> bool:
    """Whether this CPU's recurrent layers run at a bfloat16 ``precision``: not every CPU has the instructions."""
    layer = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell](8, 8, batch_first=True)
    inputs = torch.zeros(2, 3, 8)
    try:
        if precision.endswith("-true"):  # the weights themselves in bfloat16
            layer.to(torch.bfloat16)(inputs.to(torch.bfloat16))
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                layer(inputs)
    except RuntimeError:
        return False
    return True


def train(config: ExperimentConfig, output: str | Path, resume: bool = True) -> Path | None:
    """Train, then write the bundle of the best checkpoint to ``output/bundle``.

    Rerunning with the same output directory resumes from its last checkpoint.
    Returns the bundle's path (``None`` on ranks other than 0).
    """
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ConfigurationError(f"output: {output} is a file; name the run's directory")
    for section in (config.model, config.tokenizer, config.training):  # before the data is read and the run written
        section.check_trainable()
    # The run's bundle must not be written over one it starts from or learns from.
    named = [config.training.init_from, config.training.teacher]
    check_apart(output / "bundle", [member for name in named if name for member in ensemble_members(name)])
    pl.seed_everything(config.training.seed, workers=True, verbose=False)
    trainer, checkpoint = build_trainer(config, output)  # first: a device setting it refuses costs nothing
    train_examples, dev_examples = load_data(config)
    data_fingerprint = examples_fingerprint(train_examples)
    related = load_related_bundles(config)
    if is_rank_zero() and not (resume and last_checkpoint(output).is_file()):
        # Afresh means without the old checkpoints: a later rerun would resume from them, and the
        # best checkpoint of an attempt killed before its first resume point would lie beside this run's.
        # Before the new stamp, so that a run stopped in between cannot resume them under it.
        shutil.rmtree(output / "checkpoints", ignore_errors=True)
    elif is_rank_zero():
        # A checkpoint's temporary file that a kill left mid-save (training.resume.CheckpointBeside):
        # as large as the checkpoint, and nothing else would ever remove it.
        for cut_short in (output / "checkpoints").glob("*.ckpt.*.tmp"):
            cut_short.unlink(missing_ok=True)
    if not resume and is_rank_zero():
        # ... and without the old teacher's table (another run would learn from it), unless that
        # table is the one that teaches this run.
        table, taught_by = teacher_table(output), related.get("teacher")
        if not (isinstance(taught_by, TeacherTable) and taught_by.directory.resolve() == table.resolve()):
            shutil.rmtree(table, ignore_errors=True)
    seeding = stamp_run(
        output, config, data_fingerprint, related, resuming=resume, dev_fingerprint=examples_fingerprint(dev_examples)
    )
    lent = next(iter(related.values()), None)
    if lent is not None:
        source_tokenizer, target_tokenizer = lent.source_tokenizer, lent.target_tokenizer
    else:
        source_tokenizer, target_tokenizer = prepare_tokenizers(
            train_examples, config, output / "tokenizer", data_fingerprint
        )
    datamodule = PairDataModule(
        train_examples, dev_examples, source_tokenizer, target_tokenizer, config.data, config.training.seed, seeding
    )
    train_set = datamodule.train_set
    if not len(train_set):
        raise DataError(
            f"{config.data.train}: no training pair is within data.max_source_length / data.max_target_length"
        )
    over = sum(train_set.cost(i) > config.data.max_tokens for i in range(len(train_set)))
    if over:  # each would be a batch of its own, over the budget
        raise ConfigurationError(
            f"data.max_tokens: {over} training pairs need more than its {config.data.max_tokens} tokens (the longer "
            "side, with EOS); raise it, or leave them out with data.max_source_length / data.max_target_length"
        )
    if 0 < len(datamodule.dev_set) < trainer.world_size:
        # Each process validates on pairs of its own: with fewer, some would count twice.
        raise ConfigurationError(
            f"the dev set has {len(datamodule.dev_set)} pairs, fewer than the {trainer.world_size} training "
            "processes; give a larger one (--valid)"
        )
    interval = config.training.val_check_interval
    if interval > 1 and interval > (batches := datamodule.epoch_batches(trainer.world_size)):
        # Lightning would find it only once fit has started, with a traceback
        raise ConfigurationError(f"training.val_check_interval: {interval:g} batches; an epoch has {batches}")
    if train_set.dropped and is_rank_zero():
        print(
            f"{train_set.dropped} training pairs are longer than data.max_source_length / "
            "data.max_target_length and were left out"
        )
    if train_set.with_unknown and is_rank_zero():
        print(
            f"warning: {train_set.with_unknown} training pairs hold pieces past the vocabulary "
            "(tokenizer.source_vocab_size / target_vocab_size), which the model reads and writes as UNK"
        )
    teacher = related.get("teacher")
    facts = table_facts(teacher, data_fingerprint, config.data, config.tokenizer) if isinstance(teacher, Bundle) else {}
    kept = kept_table(teacher_table(output), facts) if facts else None
    if kept is not None:  # this run's own, made before it was stopped: it teaches as its teachers did
        related["teacher"] = teacher = kept
        if is_rank_zero():
            print(f"teacher's distributions read from {kept.directory}, which this run kept: its teachers do not run")
    if isinstance(teacher, TeacherTable):
        teacher.check(data_fingerprint, config.data, datamodule.train_set)
    module = build_module(config, related, (source_tokenizer.vocab_size, target_tokenizer.vocab_size))
    if isinstance(teacher, Bundle):  # the table its teacher makes is kept for other runs; a loaded one is kept
        module.distillation.on_made = partial(
            keep_table, teacher_table(output), tokenizers=(source_tokenizer, target_tokenizer), facts=facts
        )
    weights_of = {key: bundle.fingerprint for key, bundle in related.items()}  # which init_from, which teacher
    ancestry = related_ancestry(related)
    del related, lent, teacher  # the teacher lives on in the module until its table is made
    last = last_checkpoint(output)
    ckpt_path = str(last) if resume and last.is_file() else None
    if ckpt_path:
        check_resumable(last)
        if trainer.is_global_zero:
            print(f"resuming from {last}")
    started = time.monotonic()
    with interruption_kept(trainer):
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except MisconfigurationException as error:  # settings that only the data shows wrong
            raise ConfigurationError(f"training: {error}") from error
    if not trainer.is_global_zero:
        return None

    best_path = checkpoint.best_model_path
    if best_path:
        best = Seq2SeqModule.load_from_checkpoint(best_path, map_location="cpu", weights_only=False)
    elif last.is_file():
        # The budget ran out before the first validation: the weights as they are, from the
        # checkpoint saved at the end, which holds the moving average with EMA on. The module
        # would not: a rerun of a finished run trains nothing, and EMA never swaps its average in.
        best = Seq2SeqModule.load_from_checkpoint(last, map_location="cpu", weights_only=False)
    else:
        best = module.cpu()
    best_score = checkpoint.best_model_score
    facts = {
        "data": config.data.train,
        "data_fingerprint": data_fingerprint,
        "train_pairs": len(datamodule.train_set),
        "dev_examples": len(dev_examples),
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "best_checkpoint": Path(best_path).name if best_path else None,
        "best_dev": {config.training.monitor: float(best_score)} if best_score is not None else {},
        "seconds_this_run": round(time.monotonic() - started, 1),
        "device": str(trainer.strategy.root_device),
        "parameters": best.model.num_parameters(),
        "related_bundles": weights_of,
        "ancestry": ancestry,  # what they trained on: a benchmark checks that no test word is among it
        "config": to_dict(config),
    }
    bundle = save_bundle(
        output / "bundle", best.model, source_tokenizer, target_tokenizer, config.tokenizer, config.name, facts
    )
    print(f"bundle written to {bundle}")
    return bundle
