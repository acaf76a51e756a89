"""Inputs of a batch generation job: plain text, TSV (``id<TAB>source``) or JSONL, one item a line.

Every non-blank line is one item; its position among them (``index``) is its place
in the output. A JSONL line may carry its own decoding settings, which override the
job's. With a job-level seed every item gets its own random stream, derived from
the seed and the item's id, so sampled output does not depend on batch size, sort
order or the number of devices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genrnn.config import DecodingConfig, decoding_for_mode, fields_read, over_job_cap
from genrnn.data import (
    OVERLONG_LINE,
    NotJSON,
    decode_line,
    is_blank,
    is_unicode_text,
    json_line,
    line_problem,
    numbered_lines,
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


def read_items(
    path: str | Path, defaults: DecodingConfig, skip_bad_lines: bool = False
) -> tuple[list[Item], list[BadLine]]:
    """Items of an input file, and its bad lines (only with ``skip_bad_lines``; else the first one raises)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file not found: {path}")
    problem = over_job_cap(defaults)
    if problem:
        raise ConfigurationError(problem)
    parse = _PARSERS[input_format(path)]
    try:  # the settings of every line without overrides: made once, not for each of a million lines
        plain = _line_settings(defaults, {})
    except _Malformed as error:
        raise ConfigurationError(str(error)) from None
    items: list[Item] = []
    bad: list[BadLine] = []
    lines_of: dict[ItemId, int] = {}  # each id in the output, and the line that holds it
    for number, raw in numbered_lines(path):
        index = len(items) + len(bad)
        given = None  # the id the line gives, once it is read
        try:
            if raw is None:
                raise _Malformed(OVERLONG_LINE)
            line = decode_line(raw)
            problem = line_problem(line)
            if problem:
                raise _Malformed(problem)
            if not line.strip():
                continue
            given, source, overrides = parse(line)
            item_id = number if given is None else given
            if item_id in lines_of:  # the output could not tell them apart, nor could their seeds
                if given is None:
                    problem = f"it has no id, and its line number is line {lines_of[item_id]}'s id; give it one"
                else:
                    problem = f"id {json.dumps(item_id, ensure_ascii=False)} is line {lines_of[item_id]}'s too"
                raise _Malformed(f"{problem} (ids must be unique)")
            if is_blank(source):  # zero-width spaces and the like: the tokenizer would read nothing
                raise _Malformed("the source holds only unseen characters (such as zero-width spaces)")
            length = read_length(source, MAX_SOURCE_LENGTH)
            if length > MAX_SOURCE_LENGTH:
                forms = " in Unicode's compatibility forms (NFKC)" if length > len(source) else ""
                raise _Malformed(f"the source has {length:,} characters{forms}; at most {MAX_SOURCE_LENGTH:,}")
            settings = _line_settings(defaults, overrides) if overrides else plain
            items.append(Item(index, number, item_id, source, _item_settings(defaults, settings, overrides, item_id)))
            lines_of[item_id] = number
        except (_Malformed, UnicodeDecodeError) as error:
            message = "not valid UTF-8" if isinstance(error, UnicodeDecodeError) else str(error)
            if not skip_bad_lines:
                raise DataError(f"{path}:{number}: {message} (--skip-bad-lines records it and goes on)") from None
            if given is None:  # the parser's error may name the id the line gives
                given = getattr(error, "item_id", None)
            # A bad line keeps an id it gives from later lines; its line number, standing in
            # for one it does not give, takes no id from a line that gives it.
            if given is not None:
                lines_of.setdefault(given, number)
            bad.append(BadLine(index, number, number if given is None else given, message))
    if not items and not bad:
        raise DataError(f"{path}: no inputs")
    return items, bad


def items_fingerprint(items: list[Item], bad_lines: list[BadLine]) -> str:
    """sha256 of what a job decodes and records: every item with its settings, and every bad line.

    Taken from the items as read, not from the file: a file changed while the job starts,
    or the same bytes read in another format, give other items.
    """
    # vars: a flat dataclass's fields, as asdict gives them, without asdict's deep copy of each
    records = [[i.index, i.id, i.source, vars(i.settings)] for i in items]
    records += [[b.index, b.id, b.line, b.error] for b in bad_lines]
    return hashlib.sha256(json.dumps(records, ensure_ascii=False).encode()).hexdigest()
