"""Inputs of a batch generation job: plain text, TSV (``id<TAB>source``) or JSONL, one item a line.

Every non-blank line is one item; its position among them (``index``) is its place
in the output. A JSONL line may carry its own decoding settings, which override the
job's. With a job-level seed every item gets its own random stream, derived from
the seed and the item's id, so sampled output does not depend on batch size, sort
order or the number of devices.

A job reads its file twice: once whole, to check every line and note where each item
is (:func:`scan_items`), and then a batch's lines at a time, as it decodes them
(:meth:`ItemTable.items`), so that it never holds the items of a large file at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import zlib
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genrnn.config import DecodingConfig, decoding_for_mode, fields_read, over_job_cap
from genrnn.data import (
    OVERLONG_LINE,
    NotJSON,
    check_data_file,
    decode_line,
    is_blank,
    is_unicode_text,
    json_line,
    line_at,
    line_problem,
    placed_lines,
    read_length,
)
from genrnn.decoding import item_seed
from genrnn.errors import ConfigurationError, DataError, shown

# The longest source a line may hold (characters), beside genrnn.config.JOB_CAPS: a batch is
# padded to its longest source, and one of them must not make its batch fail.
MAX_SOURCE_LENGTH = 4096
SETTING_KEYS = frozenset(f.name for f in dataclasses.fields(DecodingConfig))

ItemId = str | int


@dataclass(frozen=True)
class Item:
    """One input to decode."""

    index: int  # place in the output
    line: int  # line number in the input file
    id: ItemId
    source: str
    settings: DecodingConfig

    def output(self, candidates: list[dict[str, Any]]) -> dict[str, Any]:
        """The output object: the same candidate objects as the HTTP reply."""
        return {"id": self.id, "input": self.source, "candidates": candidates}

    def failure(self, error: str) -> dict[str, Any]:
        """The output object of an item that could not be decoded: a bad line's."""
        return BadLine(self.index, self.line, self.id, error).output()


@dataclass(frozen=True)
class BadLine:
    """A malformed input line, recorded in the output in its place when bad lines are skipped."""

    index: int
    line: int
    id: ItemId
    error: str

    def output(self) -> dict[str, Any]:
        return {"id": self.id, "line": self.line, "error": self.error}


class _Malformed(Exception):
    """A line that cannot become an item; carries the id when one was read."""

    def __init__(self, message: str, item_id: ItemId | None = None) -> None:
        super().__init__(message)
        self.item_id = item_id


def input_format(path: Path) -> str:
    """``jsonl``, ``tsv`` or ``text``, by the file's suffix."""
    return {".jsonl": "jsonl", ".tsv": "tsv"}.get(path.suffix.lower(), "text")


# A parser's reading of one line: the id it gives (None: none, and its line number stands
# for it), the source, and the line's own decoding settings.
Parsed = tuple[ItemId | None, str, dict[str, Any]]


def _parse_text(line: str) -> Parsed:
    return None, line.strip(), {}


def _parse_tsv(line: str) -> Parsed:
    fields = line.rstrip("\t ").split("\t")  # spreadsheets export trailing tabs
    if len(fields) != 2:
        raise _Malformed(f"expected 'id<TAB>source', found {len(fields)} tab-separated fields")
    item_id, source = fields[0].strip(), fields[1].strip()
    if not item_id or not source:
        raise _Malformed("empty id or source", item_id or None)
    return item_id, source, {}


def _parse_jsonl(line: str) -> Parsed:
    try:
        record = json_line(line)
    except NotJSON as error:
        raise _Malformed(str(error)) from None
    if not isinstance(record, dict):
        raise _Malformed('expected an object with "source"')
    item_id = record.pop("id", None)
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int, type(None))):
        raise _Malformed('"id" must be a string or an integer')
    if isinstance(item_id, str) and not is_unicode_text(item_id):
        raise _Malformed('"id" holds a lone surrogate (\\ud800-\\udfff), not text')
    if isinstance(item_id, str) and not item_id.strip():  # as TSV refuses an empty id
        raise _Malformed('"id" is empty')
    source = record.pop("source", None)
    if not isinstance(source, str) or not source.strip():
        raise _Malformed('"source" must be a non-empty string', item_id)
    if not is_unicode_text(source):
        raise _Malformed('"source" holds a lone surrogate (\\ud800-\\udfff), not text', item_id)
    if "max_new_tokens" in record and record["max_new_tokens"] is None:  # the default, as over HTTP
        del record["max_new_tokens"]
    unknown = sorted(set(record) - SETTING_KEYS)
    if unknown:
        allowed = ", ".join(["id", "source", *sorted(SETTING_KEYS)])
        raise _Malformed(f"unknown key {shown(unknown[0])}; allowed keys: {allowed}", item_id)
    return item_id, source.strip(), record


_PARSERS = {"text": _parse_text, "tsv": _parse_tsv, "jsonl": _parse_jsonl}


def _line_settings(defaults: DecodingConfig, overrides: dict[str, Any]) -> DecodingConfig:
    """The job's settings with a line's overrides: the fields the line's mode reads, checked.

    ``defaults`` holds every option of the job, also those its own mode does not read:
    a line in another mode reads them (a greedy job's ``--seed`` seeds its sampled lines).
    """
    try:
        settings = decoding_for_mode({**dataclasses.asdict(defaults), **overrides})
    except ConfigurationError as error:
        raise _Malformed(str(error)) from None
    problem = over_job_cap(settings)
    if problem:
        raise _Malformed(problem)
    return settings


def _item_settings(
    defaults: DecodingConfig, settings: DecodingConfig, overrides: dict[str, Any], item_id: ItemId
) -> DecodingConfig:
    """A line's settings with the item's own seed, where the job has one and the line sets none."""
    if "seed" in fields_read(settings.mode) and "seed" not in overrides and defaults.seed is not None:
        return dataclasses.replace(settings, seed=item_seed(defaults.seed, item_id))
    return settings


class _Ids:
    """The ids the items so far have taken, and the line that took each.

    A line without an id takes its number, marked in a byte a line; only the ids that
    lines give are kept as themselves.
    """

    def __init__(self) -> None:
        self.numbers = bytearray()  # numbers[n]: line n, giving no id, took n
        self.given: dict[ItemId, int] = {}

    def holder(self, item_id: ItemId) -> int | None:
        """The line that took ``item_id``, if one did."""
        line = self.given.get(item_id)
        if line is None and isinstance(item_id, int) and 0 < item_id < len(self.numbers) and self.numbers[item_id]:
            return item_id
        return line

    def take(self, item_id: ItemId, number: int, given: bool) -> None:
        """Mark ``item_id`` as line ``number``'s, unless a line took it before (a bad line may give a taken id)."""
        if given:
            if self.holder(item_id) is None:
                self.given[item_id] = number
        else:
            self.numbers.extend(bytes(number + 1 - len(self.numbers)))
            self.numbers[number] = 1


class _Fingerprint:
    """sha256 of the JSON list of a job's records, fed a record at a time: the digest of ``json.dumps`` of the
    whole list, which an earlier version of genrnn stamped jobs with, without the list in memory."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256(b"[")
        self.separator = b""

    def add(self, record: list[Any]) -> None:
        self.hash.update(self.separator + json.dumps(record, ensure_ascii=False).encode())
        self.separator = b", "

    def hexdigest(self) -> str:
        whole = self.hash.copy()
        whole.update(b"]")
        return whole.hexdigest()


def _item_record(item: Item) -> list[Any]:
    # vars: a flat dataclass's fields, as asdict gives them, without asdict's deep copy of each
    return [item.index, item.id, item.source, vars(item.settings)]


def _bad_line_record(bad: BadLine) -> list[Any]:
    return [bad.index, bad.id, bad.line, bad.error]


@dataclass(frozen=True)
class _LineReader:
    """Reads one line of an input file into an item's parts, checking all but the uniqueness of its id."""

    parse: Callable[[str], Parsed]
    defaults: DecodingConfig
    plain: DecodingConfig  # the settings of every line without overrides: made once, not for each of a million

    @classmethod
    def of(cls, path: Path, defaults: DecodingConfig) -> _LineReader:
        problem = over_job_cap(defaults)
        if problem:
            raise ConfigurationError(problem)
        try:
            plain = _line_settings(defaults, {})
        except _Malformed as error:
            raise ConfigurationError(str(error)) from None
        return cls(_PARSERS[input_format(path)], defaults, plain)

    def fields(self, raw: bytes | None) -> Parsed | None:
        """The id the line gives, its source and its overrides; ``None`` for a blank line."""
        if raw is None:
            raise _Malformed(OVERLONG_LINE)
        line = decode_line(raw)
        problem = line_problem(line)
        if problem:
            raise _Malformed(problem)
        return self.parse(line) if line.strip() else None

    def item(self, index: int, number: int, item_id: ItemId, source: str, overrides: dict[str, Any]) -> Item:
        """The item of a parsed line whose id is its own."""
        if is_blank(source):  # zero-width spaces and the like: the tokenizer would read nothing
            raise _Malformed("the source holds only unseen characters (such as zero-width spaces)")
        length = read_length(source, MAX_SOURCE_LENGTH)
        if length > MAX_SOURCE_LENGTH:
            forms = " in Unicode's compatibility forms (NFKC)" if length > len(source) else ""
            raise _Malformed(f"the source has {length:,} characters{forms}; at most {MAX_SOURCE_LENGTH:,}")
        return self._assembled(index, number, item_id, source, overrides)

    def item_again(self, index: int, number: int, raw: bytes) -> Item:
        """The item of a line that :meth:`item` took before, its bytes the same: without the checks it passed."""
        given, source, overrides = self.parse(decode_line(raw))
        return self._assembled(index, number, number if given is None else given, source, overrides)

    def _assembled(self, index: int, number: int, item_id: ItemId, source: str, overrides: dict[str, Any]) -> Item:
        settings = _line_settings(self.defaults, overrides) if overrides else self.plain
        return Item(index, number, item_id, source, _item_settings(self.defaults, settings, overrides, item_id))


@dataclass(frozen=True)
class ItemTable:
    """The items of an input file in a few bytes each: where each one's line is, and its source's length.

    A job of millions of lines holds this rather than the items, and reads a batch's
    items from the file again when it decodes them (:meth:`items`).
    """

    path: Path
    reader: _LineReader
    bad_lines: list[BadLine]
    fingerprint: str  # sha256 of what the job decodes and records: every item with its settings, every bad line
    # For each item, in input order:
    index: array  # its place in the output
    line: array  # its line's number
    offset: array  # where its line starts in the file
    crc: array  # its line's bytes' CRC-32, to see the file changed since
    length: array  # its source's length in characters: batches are cut by it

    def __len__(self) -> int:
        return len(self.index)

    @property
    def total(self) -> int:
        """The items and the bad lines: the places in the output."""
        return len(self.index) + len(self.bad_lines)

    def items(self, positions: Iterable[int] | None = None) -> list[Item]:
        """The items at ``positions`` (all of them by default), read again from the file."""
        positions = range(len(self)) if positions is None else positions
        changed = DataError(
            f"{self.path} changed while the job read it: put it back as it was to go on, "
            "or remove the output's .parts directory to start afresh"
        )
        items = []
        with self.path.open("rb") as file:
            try:
                data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file
                raise changed from None
        with data:
            for position in positions:
                raw = line_at(data, self.offset[position])
                if zlib.crc32(raw) != self.crc[position]:
                    raise changed
                items.append(self.reader.item_again(self.index[position], self.line[position], raw))
        return items


def scan_items(path: str | Path, defaults: DecodingConfig, skip_bad_lines: bool = False) -> ItemTable:
    """Read an input file's items into a table, and its bad lines (only with ``skip_bad_lines``; else the
    first one raises)."""
    path = Path(path)
    check_data_file(path, "input", "a text, TSV or JSONL file")
    reader = _LineReader.of(path, defaults)
    fingerprint, ids, bad = _Fingerprint(), _Ids(), []
    indices, lines, offsets, crcs, lengths = array("q"), array("q"), array("q"), array("I"), array("i")
    for number, offset, raw in placed_lines(path):
        index = len(indices) + len(bad)
        given = None  # the id the line gives, once it is read
        try:
            fields = reader.fields(raw)
            if fields is None:
                continue
            given, source, overrides = fields
            item_id = number if given is None else given
            holder = ids.holder(item_id)
            if holder is not None:  # the output could not tell them apart, nor could their seeds
                if given is None:
                    problem = f"it has no id, and its line number is line {holder}'s id; give it one"
                else:
                    problem = f"id {json.dumps(item_id, ensure_ascii=False)} is line {holder}'s too"
                raise _Malformed(f"{problem} (ids must be unique)")
            item = reader.item(index, number, item_id, source, overrides)
            ids.take(item_id, number, given is not None)
        except (_Malformed, UnicodeDecodeError) as error:
            message = "not valid UTF-8" if isinstance(error, UnicodeDecodeError) else str(error)
            if not skip_bad_lines:
                raise DataError(f"{path}:{number}: {message} (--skip-bad-lines records it and goes on)") from None
            if given is None:  # the parser's error may name the id the line gives
                given = getattr(error, "item_id", None)
            # A bad line keeps an id it gives from later lines; its line number, standing in
            # for one it does not give, takes no id from a line that gives it.
            if given is not None:
                ids.take(given, number, given=True)
            bad.append(BadLine(index, number, number if given is None else given, message))
            continue
        fingerprint.add(_item_record(item))
        indices.append(index)
        lines.append(number)
        offsets.append(offset)
        crcs.append(zlib.crc32(raw))
        lengths.append(len(item.source))
    for line in bad:  # the bad lines' records come after every item's
        fingerprint.add(_bad_line_record(line))
    return ItemTable(path, reader, bad, fingerprint.hexdigest(), indices, lines, offsets, crcs, lengths)


def read_items(
    path: str | Path, defaults: DecodingConfig, skip_bad_lines: bool = False
) -> tuple[list[Item], list[BadLine]]:
    """Items of an input file, all in memory, and its bad lines: :func:`scan_items` for a small file."""
    table = scan_items(path, defaults, skip_bad_lines)
    return table.items(), table.bad_lines
