"""sentencepiece tokenizers with the fixed special ids ``pad=0, unk=1, bos=2, eos=3``."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from genrnn.config import TokenizerConfig
from genrnn.errors import BundleError, ConfigurationError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_CONTROL_IDS = frozenset((PAD_ID, BOS_ID, EOS_ID))


class Tokenizer:
    """One sentencepiece model: text ↔ ids, in batches, with the project's special ids."""

    def __init__(self, model_proto: bytes) -> None:
        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        specials = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if specials != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise BundleError(f"sentencepiece model has special ids {specials}; genrnn needs (0, 1, 2, 3)")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        try:
            return cls(path.read_bytes())
        except RuntimeError:  # sentencepiece's, which names only a line of its C++ source
            raise BundleError(f"{path} is not a sentencepiece model (it does not parse)") from None
        except BundleError as error:
            raise BundleError(f"{path}: {error}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.model_proto)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without BOS or EOS."""
        # One thread, here and in decode: otherwise sentencepiece starts a thread pool per call,
        # which costs more than it saves on words and sentences (1,024 words: 1.4 ms, one thread 0.6).
        return self._sp.encode(list(texts), num_threads=1)

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Texts of each id list; PAD, BOS and EOS are dropped, UNK is sentencepiece's " ⁇ "."""
        return self._sp.decode([[i for i in row if i not in _CONTROL_IDS] for row in ids], num_threads=1)

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)


def train_tokenizer(texts: Iterable[str], model_type: str, vocab_size: int, normalize: bool = True) -> Tokenizer:
    """Train a sentencepiece model on ``texts``; ``vocab_size`` is an upper bound.

    ``normalize``: map text to Unicode's compatibility forms first (NFKC: full-width
    letters, ligatures, modifier letters such as ʰ), as sentencepiece does by default. A
    model that writes targets must not: it could never write a reference as it stands.
    """
    texts = list(texts)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        # sentencepiece leaves out, without a word, every text over 4,192 bytes by default
        max_sentence_length=max([4192, *(len(text.encode()) + 1 for text in texts)]),
        model_writer=buffer,
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # small corpora may not have vocab_size pieces
        character_coverage=1.0,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        # A char model would otherwise spend one step on a leading "▁" per input.
        add_dummy_prefix=model_type != "char",
        normalization_rule_name="nmt_nfkc" if normalize else "identity",
        minloglevel=2,
        num_threads=1,
    )
    return Tokenizer(buffer.getvalue())


def train_tokenizers(
    sources: Sequence[str], targets: Sequence[str], config: TokenizerConfig
) -> tuple[Tokenizer, Tokenizer]:
    """Source and target tokenizers trained on the training pairs (one shared model if asked).

    A shared model writes targets too, so it reads sources as they stand (no NFKC).
    """
    config.check_trainable()
    if config.shared:
        texts = [*sources, *targets]
        shared = _trained(texts, config.source_type, config.source_vocab_size, "source", False, "sources and targets")
        return shared, shared
    source = _trained(sources, config.source_type, config.source_vocab_size, "source", True, "sources")
    target = _trained(targets, config.target_type, config.target_vocab_size, "target", False, "targets")
    return source, target


def _trained(
    texts: Sequence[str], model_type: str, vocab_size: int, side: str, normalize: bool, corpus: str
) -> Tokenizer:
    """:func:`train_tokenizer`, with sentencepiece's refusal (too small a vocabulary) told as a setting's.

    ``side`` names the setting (``tokenizer.{side}_vocab_size``), ``corpus`` what it was trained on.
    """
    try:
        return train_tokenizer(texts, model_type, vocab_size, normalize)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1]
        raise ConfigurationError(
            f"tokenizer.{side}_vocab_size: a {model_type} model of {vocab_size} pieces cannot be trained "
            f"on the {corpus}: {reason}"
        ) from None


def tokenizers_fingerprint(source: Tokenizer, target: Tokenizer) -> str:
    """sha256 of a source and a target tokenizer's models: whatever shares it shares their vocabularies."""
    return hashlib.sha256(source.model_proto + target.model_proto).hexdigest()
