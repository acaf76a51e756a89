"""Typed, immutable configuration: parsed once from YAML, validated at the edge.

Every section is a frozen dataclass. ``from_dict`` rejects unknown keys and checks
types, and each class's ``__post_init__`` checks ranges and enumerated choices
(``Literal`` annotations), so that a config built in Python is checked too; every
error names the offending key.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from genrnn.errors import ConfigurationError, shown

T = TypeVar("T")

CellType = Literal["lstm", "gru", "rnn"]
BridgeType = Literal["bridge", "last", "zero"]
AttentionType = Literal["none", "luong", "bahdanau"]
AttentionQuery = Literal["top", "bottom"]
DecodingMode = Literal["greedy", "sample", "beam"]
LengthPenaltyForm = Literal["gnmt", "average"]
# How an ensemble combines its members' next-token distributions:
#   probabilities      the mean of the probabilities (a mixture: one member can keep a token alive)
#   log-probabilities  the mean of the log-probabilities, renormalised (a product: the members must agree)
Averaging = Literal["probabilities", "log-probabilities"]
AVERAGINGS: tuple[str, ...] = typing.get_args(Averaging)
DEFAULT_AVERAGING: Averaging = "probabilities"
Precision = Literal["32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "32", "16", "bf16", "64"]


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigurationError(f"{key}: {message}")


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a type annotation, converting YAML scalars where safe."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if isinstance(value, int) and not isinstance(value, bool) and str(value) in choices:  # precision: 16
            value = str(value)
        _require(value in choices, key, f"must be one of {', '.join(map(str, choices))}; got {shown(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _convert(value, inner, key)
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, prefix=key)
    if annotation is bool:
        _require(isinstance(value, bool), key, f"must be true or false; got {shown(value)}")
        return value
    if annotation is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer; got {shown(value)}")
        return value
    if annotation is float:
        number = value
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        try:
            ok = isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number)
        except OverflowError:  # an int beyond any float
            ok = False
        _require(ok, key, f"must be a number; got {shown(value)}")
        return float(number)
    if annotation is str:
        if isinstance(value, int) and not isinstance(value, bool):  # devices: 2
            return str(value)
        _require(isinstance(value, str), key, f"must be a string; got {shown(value)}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """A dataclass's fields and their types, resolved once: requests and batch lines build configs too."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def _choice_fields(cls: type) -> tuple[tuple[str, Any], ...]:
    """A dataclass's enumerated fields (``Literal``) and their types, found once."""
    return tuple((name, kind) for name, kind in _field_types(cls).items() if typing.get_origin(kind) is Literal)


@functools.cache
def _numeric_fields(cls: type) -> dict[str, str]:
    """A dataclass's number fields, each with what it must be ("an integer", "a number"), found once."""
    numeric = {name: {int, float} & {kind, *typing.get_args(kind)} for name, kind in _field_types(cls).items()}
    return {name: "an integer" if kinds == {int} else "a number" for name, kinds in numeric.items() if kinds}


def _require_choices(config: Any, prefix: str = "") -> None:
    """Check a config's enumerated fields (``Literal``): one built in Python skips ``from_dict``."""
    for name, annotation in _choice_fields(type(config)):
        _convert(getattr(config, name), annotation, prefix + name)


def from_dict(cls: type[T], values: Any, prefix: str = "") -> T:
    """Build the dataclass ``cls`` from a mapping, naming any bad key in the error."""
    where = prefix or cls.__name__
    if values is None:
        values = {}
    _require(isinstance(values, dict), where, f"must be a mapping; got {type(values).__name__}")
    hints = _field_types(cls)
    names = set(hints)
    unknown = sorted(map(str, set(values) - names))  # YAML keys may be numbers or booleans
    _require(
        not unknown,
        f"{prefix + '.' if prefix else ''}{unknown[0] if unknown else ''}",
        f"unknown key; allowed keys: {', '.join(sorted(names))}",
    )
    kwargs = {
        name: _convert(value, hints[name], f"{prefix + '.' if prefix else ''}{name}") for name, value in values.items()
    }
    try:
        return cls(**kwargs)
    except ConfigurationError as error:
        # DecodingConfig names its fields as the command line and HTTP do; in a file they sit in a section.
        if prefix and not str(error).startswith(f"{prefix}."):
            raise ConfigurationError(f"{prefix}.{error}") from None
        raise


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-data form of a config, for YAML and JSON."""
    return dataclasses.asdict(config)


MAX_LAYERS = 64  # per stack; a manifest edited by hand could otherwise ask for millions
MAX_WIDTH = 65_536  # units of an embedding or a layer: one such LSTM layer is already 17 G parameters


@dataclass(frozen=True)
class ModelConfig:
    """Encoder–decoder architecture."""

    cell: CellType = "lstm"
    embedding_dim: int = 128  # source and target embeddings
    encoder_hidden: int = 256  # per direction
    encoder_layers: int = 2
    bidirectional: bool = True
    decoder_hidden: int = 512
    decoder_layers: int = 2
    bridge: BridgeType = "bridge"  # how the encoder's final state initialises the decoder
    residual: bool = False  # residual connections from the second stacked layer on
    embedding_dropout: float = 0.1
    layer_dropout: float = 0.2  # between stacked layers
    output_dropout: float = 0.2  # on the decoder output, before the projection
    tie_embeddings: bool = False  # share target embedding and output projection
    # On top of the bridge: Luong's global attention with input feeding, or Bahdanau's
    # additive attention. Either steps the decoder one token at a time in training (slower).
    attention: AttentionType = "none"
    attention_size: int = 256  # hidden size of Bahdanau's scoring layer
    # Luong only: feed the previous attentional vector into the decoder. Off, training runs the
    # decoder over the whole target in one fused call and attends to every position at once.
    input_feeding: bool = True
    # Bahdanau only: which decoder layer's previous state asks where to attend. "bottom" (as in
    # GNMT): only the first layer then steps one token at a time in training, and the layers
    # above run over the whole target in one fused call each.
    attention_query: AttentionQuery = "top"

    def __post_init__(self) -> None:
        _require_choices(self, "model.")
        for name in ("embedding_dim", "encoder_hidden", "encoder_layers", "decoder_hidden", "decoder_layers"):
            _require(getattr(self, name) >= 1, f"model.{name}", "must be at least 1")
        for name in ("encoder_layers", "decoder_layers"):  # far past any recurrent stack that trains
            _require(getattr(self, name) <= MAX_LAYERS, f"model.{name}", f"must be at most {MAX_LAYERS}")
        for name in ("embedding_dim", "encoder_hidden", "decoder_hidden", "attention_size"):
            _require(getattr(self, name) <= MAX_WIDTH, f"model.{name}", f"must be at most {MAX_WIDTH:,}")
        for name in ("embedding_dropout", "layer_dropout", "output_dropout"):
            _require(0.0 <= getattr(self, name) < 1.0, f"model.{name}", "must be in [0, 1)")
        if self.bridge == "last":
            _require(
                self.encoder_output_size == self.decoder_hidden,
                "model.bridge",
                f"'last' copies the encoder state, so decoder_hidden ({self.decoder_hidden}) must equal "
                f"encoder_hidden × directions ({self.encoder_output_size}); use 'bridge' otherwise",
            )
            _require(
                self.encoder_layers >= self.decoder_layers,
                "model.bridge",
                "'last' needs at least as many encoder layers as decoder layers; use 'bridge' otherwise",
            )
        _require(self.attention_size >= 1, "model.attention_size", "must be at least 1")
        _require(
            self.input_feeding or self.attention == "luong",
            "model.input_feeding",
            "can be switched off only for Luong attention (Bahdanau's decoder reads the context it attends with)",
        )
        _require(
            self.attention_query == "top" or self.attention == "bahdanau",
            "model.attention_query",
            "'bottom' is for Bahdanau attention (Luong's attends with the top layer's output, which it feeds back)",
        )
        if self.tie_embeddings:
            _require(
                self.embedding_dim == self.decoder_hidden,
                "model.tie_embeddings",
                f"needs embedding_dim ({self.embedding_dim}) equal to decoder_hidden ({self.decoder_hidden})",
            )

    def check_trainable(self) -> None:
        """Refuse a decoder that would never see the source: a zero bridge without attention.

        Checked where a run starts, not in every config, so that a bundle trained before
        the check loads as it did.
        """
        _require(
            self.bridge != "zero" or self.attention != "none",
            "model.bridge",
            "'zero' starts the decoder from zeros, so without attention it never sees the source; "
            "use 'bridge' or 'last', or set model.attention",
        )

    @property
    def encoder_output_size(self) -> int:
        return self.encoder_hidden * (2 if self.bidirectional else 1)


MAX_VOCAB_SIZE = 1_000_000  # sentencepiece reads the size as a 32-bit integer; far more pieces than any task needs


@dataclass(frozen=True)
class TokenizerConfig:
    """sentencepiece models for the two sides (trained on the training data)."""

    shared: bool = False  # one model for source and target
    source_type: Literal["unigram", "bpe", "char", "word"] = "char"
    target_type: Literal["unigram", "bpe", "char", "word"] = "word"
    source_vocab_size: int = 256  # an upper bound: small data may give fewer pieces
    target_vocab_size: int = 256

    def __post_init__(self) -> None:
        _require_choices(self, "tokenizer.")
        for name in ("source_vocab_size", "target_vocab_size"):
            _require(
                8 <= getattr(self, name) <= MAX_VOCAB_SIZE, f"tokenizer.{name}", f"must be 8 to {MAX_VOCAB_SIZE:,}"
            )

    def check_trainable(self) -> None:
        """Refuse target settings that a shared model would ignore: it has one type and size.

        Checked where tokenizers are to be trained, not in every config: bundles trained
        before the check hold such settings, and load as they did.
        """
        source, target = (self.source_type, self.source_vocab_size), (self.target_type, self.target_vocab_size)
        _require(
            not self.shared or target == source,
            "tokenizer.shared",
            "one model serves both sides, so target_type and target_vocab_size must equal source_type and "
            f"source_vocab_size; got {target[0]}/{target[1]} for {source[0]}/{source[1]}",
        )


@dataclass(frozen=True)
class DataConfig:
    """Where the pairs come from and how they are batched."""

    train: str = "builtin:cmudict"  # a .tsv / .jsonl file, or builtin:cmudict
    valid: str | None = None  # defaults to the built-in dev split for builtin data
    max_tokens: int = 6000  # token budget per batch (pairs × longest side, padded)
    batch_size: int = 0  # most pairs per batch (0: only the token budget counts)
    max_source_length: int = 64  # longer training pairs are dropped
    max_target_length: int = 64
    valid_limit: int = 2000  # dev items decoded at each validation (0: all)
    num_workers: int = 0

    def __post_init__(self) -> None:
        _require(self.max_tokens >= 16, "data.max_tokens", "must be at least 16")
        _require(self.batch_size >= 0, "data.batch_size", "must be 0 (no cap) or more")
        for name in ("max_source_length", "max_target_length"):
            _require(getattr(self, name) >= 1, f"data.{name}", "must be at least 1")
        _require(self.valid_limit >= 0, "data.valid_limit", "must be 0 (all) or more")
        _require(self.num_workers >= 0, "data.num_workers", "must be 0 or more")


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser, schedule, and the training budget."""

    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 2e-3
    weight_decay: float = 0.0  # on the weight matrices, not the biases (decoupled with adamw, L2 with adam)
    # plateau: cut by plateau_factor when dev stalls; warmup: linear rise over warmup_steps, then
    # inverse square-root decay; cosine: from lr down to 0 over the budget (max_steps, max_epochs
    # or max_time, whichever runs out first); constant.
    schedule: Literal["plateau", "warmup", "cosine", "constant"] = "plateau"
    warmup_steps: int = 1000
    plateau_factor: float = 0.5
    plateau_patience: int = 2  # validations without improvement before the rate is cut
    label_smoothing: float = 0.0
    gradient_clip: float = 1.0
    ema_decay: float = 0.0  # exponential moving average of the weights, used for dev and the bundle (0: off)
    # a bundle whose weights start the model: the same model settings (but for dropout) and tokenizers
    init_from: str | None = None
    # Distillation: a bundle, or several joined by commas (an ensemble), whose next-token
    # distributions the model learns to match under teacher forcing, as distill_weight of the
    # loss; the rest is cross-entropy with the reference.
    teacher: str | None = None
    distill_weight: float = 0.5
    max_epochs: int = 60
    max_steps: int = -1
    max_time: str | None = None  # DD:HH:MM:SS
    monitor: Literal["dev_wer", "dev_per", "val_loss"] = "dev_wer"
    early_stopping_patience: int = 6  # validations without improvement
    val_check_interval: float = 1.0  # fraction of an epoch, or steps if > 1
    seed: int = 1234
    # between the checkpoints a killed run resumes from (0: at every epoch end); training's end and SIGTERM save one too
    checkpoint_minutes: float = 10.0
    precision: Precision = "32-true"
    accelerator: str = "auto"
    devices: str = "1"  # an integer, "auto", or a list like "0,1"
    num_nodes: int = 1
    strategy: str = "auto"

    def __post_init__(self) -> None:
        _require_choices(self, "training.")
        _require(self.lr > 0, "training.lr", "must be positive")
        _require(self.weight_decay >= 0, "training.weight_decay", "must be 0 (off) or more")
        _require(0 <= self.seed < 2**32, "training.seed", "must be in [0, 2**32)")
        _require(self.max_steps >= 1 or self.max_steps == -1, "training.max_steps", "must be positive or -1")
        _require(self.plateau_patience >= 0, "training.plateau_patience", "must be 0 or more")
        _require(
            0 < self.val_check_interval <= 1 or (self.val_check_interval > 1 and self.val_check_interval.is_integer()),
            "training.val_check_interval",
            "must be a fraction of an epoch in (0, 1], or a whole number of steps",
        )
        _require(0.0 <= self.label_smoothing < 1.0, "training.label_smoothing", "must be in [0, 1)")
        _require(self.gradient_clip >= 0, "training.gradient_clip", "must be 0 (off) or more")
        _require(0.0 <= self.ema_decay < 1.0, "training.ema_decay", "must be in [0, 1); 0 switches it off")
        _require(0.0 < self.distill_weight <= 1.0, "training.distill_weight", "must be in (0, 1]")
        _require(
            self.init_from is None or "," not in self.init_from or Path(self.init_from).is_dir(),  # as bundles read it
            "training.init_from",
            "names one bundle; an ensemble cannot start a single model",
        )
        _require(self.max_epochs >= 1 or self.max_epochs == -1, "training.max_epochs", "must be positive or -1")
        _require(0 < self.plateau_factor < 1, "training.plateau_factor", "must be in (0, 1)")
        _require(self.warmup_steps >= 1, "training.warmup_steps", "must be at least 1")
        _require(self.early_stopping_patience >= 1, "training.early_stopping_patience", "must be at least 1")
        _require(
            self.schedule != "plateau" or self.early_stopping_patience > self.plateau_patience + 1,
            "training.early_stopping_patience",
            "must exceed training.plateau_patience + 1, or training stops before the learning rate is ever cut",
        )
        _require(self.num_nodes >= 1, "training.num_nodes", "must be at least 1")
        _require(
            self.devices == "auto" or re.fullmatch(r"-1|[1-9][0-9]*|[0-9]+(,[0-9]+)*,?", self.devices) is not None,
            "training.devices",
            f"must be a count, 'auto', -1 (every device) or a list such as 0,1; got {self.devices!r}",
        )
        _require(self.checkpoint_minutes >= 0, "training.checkpoint_minutes", "must be 0 (at every epoch end) or more")
        if self.max_time is not None:
            # Lightning's own pattern; bounded so that the days fit a timedelta (at most 999,999,999)
            match = re.fullmatch(r"([0-9]{1,9}):([0-9]{2}):([0-9]{2}):([0-9]{2})", self.max_time)
            _require(match is not None, "training.max_time", f"must be DD:HH:MM:SS; got {self.max_time!r}")
            _require(any(int(p) for p in match.groups()), "training.max_time", "must be more than zero")

    def check_trainable(self) -> None:
        """Refuse a cosine schedule without a budget to decay over (it would hold the rate where it starts),
        and weights trained in float16.

        Checked where a run starts, not in every config, so that a run stamped before the
        checks loads as it did.
        """
        _require(
            self.schedule != "cosine" or self.max_steps > 0 or self.max_epochs > 0 or self.max_time is not None,
            "training.schedule",
            "'cosine' decays the rate over the budget: set max_steps, max_epochs or max_time",
        )
        _require(
            self.precision != "16-true",
            "training.precision",
            "16-true keeps the weights in float16, where Adam's epsilon (1e-8) is 0: a weight without a gradient "
            "(the padding's embedding) becomes NaN at the first step; use 16-mixed, bf16-mixed or bf16-true",
        )


MAX_TEMPERATURE = 100.0  # far past uniform already; beyond float32's range, logits / temperature is NaN
MAX_TOP_K = 2**31 - 1
MAX_LENGTH_PENALTY = 10.0  # GNMT's alpha; ((5 + len) / 6) ** alpha overflows long before 1e308


@dataclass(frozen=True)
class DecodingConfig:
    """How one input is decoded; the same fields as the HTTP request. NaN fails every range check."""

    mode: DecodingMode = "greedy"
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int | None = None
    num_return_sequences: int = 1
    beam_size: int = 4
    length_penalty: float = 0.6
    length_penalty_form: LengthPenaltyForm = "gnmt"  # ((5 + len) / 6) ** alpha, or the average log-probability
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        _require_choices(self)
        # Upper bounds keep every value finite in float32 and within a tensor's integers.
        _require(0 < self.temperature <= MAX_TEMPERATURE, "temperature", f"must be in (0, {MAX_TEMPERATURE:g}]")
        _require(0 <= self.top_k <= MAX_TOP_K, "top_k", f"must be 0 (off) or up to {MAX_TOP_K}")
        _require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _require(self.num_return_sequences >= 1, "num_return_sequences", "must be at least 1")
        _require(self.beam_size >= 1, "beam_size", "must be at least 1")
        _require(
            0 <= self.length_penalty <= MAX_LENGTH_PENALTY,
            "length_penalty",
            f"must be in [0, {MAX_LENGTH_PENALTY:g}]",
        )
        _require(self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1")
        if self.mode == "beam":
            _require(
                self.num_return_sequences <= self.beam_size,
                "num_return_sequences",
                f"must not exceed beam_size ({self.beam_size}) in beam mode",
            )


# The most a file's item may ask for, in batch jobs and evaluation: they bound the memory one batch
# can take, so that no item can make a batch fail (which would fail every rerun of a job too).
# The server has caps of its own, set by its operator.
JOB_CAPS = {"max_new_tokens": 1024, "beam_size": 64, "num_return_sequences": 64}


def over_job_cap(settings: DecodingConfig) -> str | None:
    """What in ``settings`` asks for more than a batch job or an evaluation allows, if anything."""
    for name, cap in JOB_CAPS.items():
        if getattr(settings, name) > cap:
            return f"{name}: at most {cap}; got {getattr(settings, name)}"
    return None


# The fields each mode reads, beside mode and max_new_tokens. A request's other fields are
# ignored, whatever their values: they neither change the output nor make it an error.
MODE_FIELDS: dict[str, frozenset[str]] = {
    "greedy": frozenset(),
    "sample": frozenset({"temperature", "top_k", "top_p", "seed", "num_return_sequences"}),
    "beam": frozenset({"beam_size", "length_penalty", "length_penalty_form", "num_return_sequences"}),
}


def fields_read(mode: str) -> frozenset[str]:
    """Every DecodingConfig field that decoding in ``mode`` reads."""
    reads = MODE_FIELDS.get(mode, frozenset()) if isinstance(mode, str) else frozenset()  # a bad mode: from_dict says
    return reads | {"mode", "max_new_tokens"}


def decoding_for_mode(values: dict[str, Any]) -> DecodingConfig:
    """A request's settings (HTTP, a batch line, the command line): the fields its mode reads, validated.

    Every field's type is checked, as HTTP's schema checks it; only those the mode reads are
    kept and checked for range.
    """
    types_of, numeric = _field_types(DecodingConfig), _numeric_fields(DecodingConfig)
    for key, value in values.items():
        if key in types_of:
            # JSON has numbers: "0.5" is text, as HTTP's schema says (a YAML file may write 1e-3 so).
            is_text = key in numeric and isinstance(value, str)
            _require(not is_text, key, f"must be {numeric.get(key)}; got {shown(value)}")
            _convert(value, types_of[key], key)
    reads = fields_read(values.get("mode", DecodingConfig.mode))
    return from_dict(DecodingConfig, {key: value for key, value in values.items() if key in reads})


@dataclass(frozen=True)
class ExperimentConfig:
    """One training run: the whole YAML file."""

    name: str = "model"
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: OptimConfig = field(default_factory=OptimConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)  # used for dev metrics

    def __post_init__(self) -> None:
        # The name names the run's directory (runs/<name>) and the bundle, which must have one.
        _require(
            bool(self.name.strip()) and "/" not in self.name and self.name not in (".", ".."),
            "name",
            f"must be a non-empty name without '/'; got {shown(self.name)}",
        )
        _require(self.name.isprintable(), "name", f"must be printable (no control characters); got {shown(self.name)}")
        # Dev decoding in training keeps to an evaluation's caps: past them, memory runs out at the first validation.
        problem = over_job_cap(decoding_for_mode(to_dict(self.decoding)))  # the fields its mode reads
        if problem:
            raise ConfigurationError(f"decoding.{problem}")


def process_rank() -> int:
    """This process's rank in a distributed launch (0 for the only process)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def is_rank_zero() -> bool:
    """Whether this process speaks for the run: rank 0 of a distributed launch, or the only process."""
    return process_rank() == 0


def parse_devices(devices: str) -> int | str:
    """A devices setting as Lightning takes it: a count ("2") as an int, "auto" or a list ("0,1") as is."""
    return int(devices) if devices.isdigit() else devices


class _Loader(yaml.SafeLoader):
    """YAML as PyYAML reads it, but for base-60 numbers and repeated keys.

    ``max_time: 10:00:00:00`` is text, not 2160000; a key given twice in one mapping is
    refused, where PyYAML keeps the last and drops the first without a word.
    """

    _SEXAGESIMAL = re.compile(r"^[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?$")

    def resolve(self, kind: type, value: Any, implicit: tuple[bool, bool]) -> str:
        if kind is yaml.ScalarNode and implicit[0] and self._SEXAGESIMAL.match(value):
            return "tag:yaml.org,2002:str"
        return super().resolve(kind, value, implicit)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *defaults": its keys may be given again
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} given twice (first on line {first_line[key]})", key_node.start_mark
                )
            if isinstance(key, Hashable):
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(text: str) -> Any:
    """A YAML document or scalar, as a config file or an override holds it."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: no Python objects


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment YAML file."""
    path = Path(path)
    try:
        values = read_yaml(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigurationError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:  # PyYAML's own message takes four lines: its problem and where, in one
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigurationError(f"{where}: not valid YAML ({problem})") from None
    except UnicodeDecodeError as error:
        raise ConfigurationError(f"{path}: not UTF-8 ({error.reason} at byte {error.start})") from None
    if values is not None and not isinstance(values, dict):
        raise ConfigurationError(
            f"{path}: must be a mapping of sections (name, model, tokenizer, data, training, decoding); "
            f"got a {type(values).__name__}"
        )
    return from_dict(ExperimentConfig, values)


def override(config: ExperimentConfig, assignments: list[str]) -> ExperimentConfig:
    """Apply ``section.key=value`` assignments (values read as YAML scalars), validating again."""
    values = to_dict(config)
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        _require(bool(sep) and bool(key), assignment, "an override must look like section.key=value")
        *sections, name = key.split(".")
        target = values
        for section in sections:
            _require(isinstance(target.get(section), dict), key, f"unknown section {section!r}")
            target = target[section]
        _require(name in target, key, "unknown key")
        target[name] = _override_value(key, raw)
    return from_dict(ExperimentConfig, values)


def _override_value(key: str, raw: str) -> Any:
    """An override's value read as a YAML scalar, except where YAML would cut or mangle a plain string."""
    try:
        value = read_yaml(raw)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or error
        raise ConfigurationError(f"{key}: {raw!r} is not a YAML value ({problem}); quote it") from None
    unquoted = not raw.lstrip().startswith(("'", '"'))
    if isinstance(value, str) and unquoted and re.search(r"\s#", raw):  # "my #1.tsv": YAML reads a comment
        return raw.strip()
    return value


def replace(config: T, **changes: Any) -> T:
    """A copy of ``config`` with some fields changed, validated again as a file's values are."""
    changed = {name: to_dict(v) if dataclasses.is_dataclass(v) else v for name, v in changes.items()}
    return from_dict(type(config), {**to_dict(config), **changed})
