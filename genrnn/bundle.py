"""The bundle: one directory that holds everything needed to decode.

```
genrnn.json        format version, configs, special ids, training facts, sha256 of every other file
model.safetensors  weights (no pickle: loading a bundle never executes code)
source.model       sentencepiece models
target.model
```
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch.overrides import TorchFunctionMode

import genrnn
from genrnn.config import DEFAULT_AVERAGING, Averaging, ModelConfig, TokenizerConfig, from_dict, to_dict
from genrnn.ensemble import Ensemble
from genrnn.errors import BundleError, ConfigurationError, shown
from genrnn.files import read_manifest, sha256, with_usual_permissions, write_manifest
from genrnn.model import Seq2Seq
from genrnn.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, tokenizers_fingerprint

FORMAT_VERSION = 1
MANIFEST = "genrnn.json"
WEIGHTS = "model.safetensors"
SOURCE_MODEL = "source.model"
TARGET_MODEL = "target.model"


@dataclass
class Bundle:
    """A loaded bundle: the model (in eval mode), its tokenizers and its metadata."""

    model: Seq2Seq
    source_tokenizer: Tokenizer
    target_tokenizer: Tokenizer
    model_config: ModelConfig
    tokenizer_config: TokenizerConfig
    name: str
    training: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """sha256 of the weights: it changes whenever the model does."""
        return self.manifest["files"][WEIGHTS]

    def ancestry(self) -> list[dict[str, Any]] | None:
        """The training data of the model (each member's) and of every model its weights or teachers came from.

        ``None`` where a model started from or taught by others does not record theirs
        (trained before bundles recorded it).
        """
        found = []
        for facts in [m["training"] for m in self.manifest.get("members", [])] or [self.training]:
            found.append({"data": facts.get("data"), "data_fingerprint": facts.get("data_fingerprint")})
            inherited = facts.get("ancestry")
            if inherited is None and facts.get("related_bundles"):
                return None
            found += inherited or []
        return [entry for i, entry in enumerate(found) if entry not in found[:i]]

    @property
    def tokenizers_fingerprint(self) -> str:
        """Bundles that share it share their vocabularies."""
        return tokenizers_fingerprint(self.source_tokenizer, self.target_tokenizer)

    def info(self) -> dict[str, Any]:
        """Metadata for people: name, versions, configs, training facts, size."""
        if "members" in self.manifest:
            return {
                "name": self.name,
                "ensemble": self.manifest["members"],
                "averaging": self.manifest["averaging"],
                "parameters": self.model.num_parameters(),
            }
        return {
            "name": self.name,
            "format_version": self.manifest.get("format_version"),
            "genrnn_version": self.manifest.get("genrnn_version"),
            "model": to_dict(self.model_config),
            "tokenizer": to_dict(self.tokenizer_config),
            "source_vocab_size": self.source_tokenizer.vocab_size,
            "target_vocab_size": self.target_tokenizer.vocab_size,
            "parameters": self.model.num_parameters(),
            "training": self.training,
        }


def save_bundle(
    directory: str | Path,
    model: Seq2Seq,
    source_tokenizer: Tokenizer,
    target_tokenizer: Tokenizer,
    tokenizer_config: TokenizerConfig,
    name: str,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write a bundle; the manifest is written last, so a half-written bundle never loads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)
    save_model(model, str(directory / WEIGHTS))
    with_usual_permissions(directory / WEIGHTS)
    source_tokenizer.save(directory / SOURCE_MODEL)
    target_tokenizer.save(directory / TARGET_MODEL)
    manifest = {
        "format_version": FORMAT_VERSION,
        "genrnn_version": genrnn.__version__,
        "name": name,
        "model": to_dict(model.config),
        "tokenizer": to_dict(tokenizer_config),
        "vocab_sizes": {"source": model.source_vocab_size, "target": model.target_vocab_size},
        "special_ids": {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID},
        "training": training or {},
        "files": {f: sha256(directory / f) for f in (WEIGHTS, SOURCE_MODEL, TARGET_MODEL)},
    }
    write_manifest(directory / MANIFEST, manifest)
    return directory


def read_bundle_manifest(directory: str | Path) -> dict[str, Any]:
    """The bundle's manifest, after checking the format version and every file's checksum."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"bundle directory not found: {directory}")
    return read_manifest(directory / MANIFEST, "genrnn bundle", FORMAT_VERSION, {WEIGHTS, SOURCE_MODEL, TARGET_MODEL})


def ensemble_members(model: str | Path) -> list[str]:
    """The bundle directories that ``model`` names: several joined by commas, or one.

    A directory whose own name holds a comma is the one bundle it is; empty names
    between commas (``a,``) are none.
    """
    if not str(model).strip():
        raise BundleError("no bundle named: --model is empty")
    if "," not in str(model) or Path(model).is_dir():
        return [str(model)]
    members = [d.strip() for d in str(model).split(",") if d.strip()]
    if not members:
        raise BundleError(f"no bundle named in {str(model)!r}")
    return members


def load_bundle(
    directory: str | Path, device: str | torch.device = "cpu", averaging: Averaging = DEFAULT_AVERAGING
) -> Bundle:
    """Load and verify a bundle; the model is placed on ``device`` in eval mode.

    Several bundle directories separated by commas load as one ensemble, whose members'
    distributions are averaged as ``averaging`` says; they must share their tokenizers. A
    directory whose own name holds a comma loads as the one bundle it is.
    """
    members = ensemble_members(directory)
    if len(members) > 1:
        return _load_ensemble(members, device, averaging)
    directory = Path(members[0])
    manifest = read_bundle_manifest(directory)
    for section in ("model", "tokenizer", "training"):  # a YAML file's empty section is none; a bundle's is no such
        if not isinstance(manifest.get(section, {}), dict):
            raise BundleError(f"{directory / MANIFEST}: {section} must be a mapping; got {shown(manifest[section])}")
    try:
        model_config = from_dict(ModelConfig, manifest["model"], prefix="model")
        tokenizer_config = from_dict(TokenizerConfig, manifest["tokenizer"], prefix="tokenizer")
    except KeyError as error:
        raise BundleError(f"{directory / MANIFEST}: has no {error.args[0]!r} section") from None
    except ConfigurationError as error:
        raise BundleError(f"{directory / MANIFEST}: bad configuration: {error}") from None
    source_tokenizer = Tokenizer.load(directory / SOURCE_MODEL)
    target_tokenizer = Tokenizer.load(directory / TARGET_MODEL)
    vocab_sizes = (source_tokenizer.vocab_size, target_tokenizer.vocab_size)
    stated = manifest.get("vocab_sizes", {})
    for side, file, size in (("source", SOURCE_MODEL, vocab_sizes[0]), ("target", TARGET_MODEL, vocab_sizes[1])):
        if isinstance(stated, dict) and stated.get(side, size) != size:  # the file at fault, before the weights
            raise BundleError(f"{directory / file} has {size} pieces; {MANIFEST} says {stated[side]!r}")
    try:
        with torch.device("meta"), _WithoutNormalDraws():  # shapes without memory: an edited manifest may ask for TBs
            skeleton = Seq2Seq(model_config, *vocab_sizes)
    except (RuntimeError, TypeError, OverflowError) as error:  # sizes past what torch can count
        raise BundleError(f"{directory / MANIFEST}: its model cannot be built: {error}") from None
    _check_shapes(skeleton, directory)
    # The weights about to be loaded make the initial ones moot: drawing them must not move the
    # caller's generator, or a run would train otherwise for having loaded a teacher.
    with torch.random.fork_rng(devices=[]):
        model = Seq2Seq(model_config, *vocab_sizes)
    try:
        load_model(model, str(directory / WEIGHTS), strict=True)
    except (RuntimeError, KeyError) as error:
        # torch lists each missing or unexpected tensor on a line of its own
        reason = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise BundleError(f"{directory / WEIGHTS} does not fit the model in {MANIFEST}: {reason}") from None
    except SafetensorError as error:
        raise BundleError(f"{directory / WEIGHTS} is not a safetensors file: {error}") from None
    name = manifest.get("name", directory.name)
    if not isinstance(name, str) or not name:
        raise BundleError(f"{directory / MANIFEST}: name must be a non-empty string; got {name!r}")
    return Bundle(
        model=model.to(device).eval(),
        source_tokenizer=source_tokenizer,
        target_tokenizer=target_tokenizer,
        model_config=model_config,
        tokenizer_config=tokenizer_config,
        name=name,
        training=manifest.get("training", {}),
        manifest=manifest,
    )


class _WithoutNormalDraws(TorchFunctionMode):
    """Skips ``normal_`` (embeddings' and orthogonal initialisation): values mean nothing on the meta
    device, and drawing them there imports torch._dynamo, 1.7 s of every process that loads a bundle."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "normal_":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def _check_shapes(model: Seq2Seq, directory: Path) -> None:
    """Refuse weights whose tensors have other shapes than the model that the manifest describes."""
    try:
        with safe_open(directory / WEIGHTS, framework="pt") as weights:
            stored = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    except SafetensorError as error:
        raise BundleError(f"{directory / WEIGHTS} is not a safetensors file: {error}") from None
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    differ = [
        f"{n}: {list(stored[n])} stored, {list(expected[n])} described"
        for n in expected
        if stored.get(n, expected[n]) != expected[n]
    ]
    if differ:
        raise BundleError(f"{directory / WEIGHTS} does not fit the model in {MANIFEST}: " + "; ".join(differ[:3]))


def _load_ensemble(directories: list[str], device: str | torch.device, averaging: Averaging) -> Bundle:
    members = [load_bundle(d, device) for d in directories]
    first = members[0]
    for directory, member in zip(directories[1:], members[1:]):
        if member.tokenizers_fingerprint != first.tokenizers_fingerprint:
            raise BundleError(f"{directory}: its tokenizers differ from {directories[0]}'s; an ensemble needs the same")
    # The averaging is part of the model: the same members averaged otherwise decode otherwise. The
    # default adds nothing, so that jobs stamped before there was a choice still resume.
    named = "" if averaging == DEFAULT_AVERAGING else averaging
    combined = hashlib.sha256((named + "".join(m.fingerprint for m in members)).encode()).hexdigest()
    return Bundle(
        model=Ensemble([m.model for m in members], averaging).eval(),
        source_tokenizer=first.source_tokenizer,
        target_tokenizer=first.target_tokenizer,
        model_config=first.model_config,
        tokenizer_config=first.tokenizer_config,
        name="+".join(m.name for m in members),
        manifest={"files": {WEIGHTS: combined}, "members": [m.info() for m in members], "averaging": averaging},
    )
