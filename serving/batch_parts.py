"""The part files of a batch job: what makes it resumable and lets several ranks write at once.

While a job runs, each rank appends its results to its own part file in
``OUTPUT.parts/``, one ``INDEX<TAB>JSON`` line per item, flushed to disk after each
batch. A line counts only once it is whole (a kill can leave half a line: it is
ignored and cut off). A rerun skips every index already in a part; at the end the
parts are merged in input order into the output, written in ``OUTPUT.parts/`` first
and renamed, so the output appears complete or not at all.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from genrnn.errors import GenrnnError
from genrnn.files import write_atomically

STAMP = "job.json"
MERGED = "merged"  # written once the output holds every part
MERGING = "output.tmp"  # the output being merged, renamed into place once whole
# An extended attribute of a merged output: the digest of the job's stamp, so that a rerun
# that finds the output in place tells its own job's from another's (a copy drops it).
JOB_ATTRIBUTE = "user.genrnn.job"


def _stamp_digest(stamp: dict[str, Any]) -> bytes:
    return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest().encode()


@dataclass(frozen=True)
class _LineStarts:
    """For each index of a job's items, the part holding its line and where the line starts (-1: none)."""

    part: array
    offset: array


class _MappedParts:
    """The part files, mapped read-only on demand; at most ``OPEN_MAPS`` at once, so that a job of many
    ranks stays within the open-file limit.
    """

    OPEN_MAPS = 64

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.maps: OrderedDict[int, mmap.mmap] = OrderedDict()  # least recently used first

    def __enter__(self) -> _MappedParts:
        return self

    def __exit__(self, *exc: object) -> None:
        for mapped in self.maps.values():
            mapped.close()

    def line(self, number: int, offset: int, index: int) -> bytes:
        """The JSON of the ``INDEX<TAB>JSON`` line at ``offset`` of part ``number``, with its newline."""
        part = self._map(number)
        tab = part.find(b"\t", offset)
        end = part.find(b"\n", tab)
        prefix = part[offset:tab]
        if tab < 0 or end < 0 or (prefix != str(index).encode() and _as_index(prefix) != index):
            raise GenrnnError(f"{self.paths[number]} changed while the job merged it; rerun to merge again")
        return part[tab + 1 : end + 1]

    def _map(self, number: int) -> mmap.mmap:
        if number in self.maps:
            self.maps.move_to_end(number)
            return self.maps[number]
        if len(self.maps) >= self.OPEN_MAPS:
            self.maps.popitem(last=False)[1].close()
        with self.paths[number].open("rb") as f:  # the map keeps a descriptor of its own
            self.maps[number] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self.maps[number]


def _as_index(text: bytes) -> int | None:
    """The index a part line starts with, as the first pass read it; ``None`` for none."""
    try:
        return int(text)
    except ValueError:
        return None


def parts_directory(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


class PartStore:
    """The part files of one job's output."""

    def __init__(self, output: str | Path) -> None:
        self.output = Path(output)
        self.directory = parts_directory(self.output)
        self._done: bytearray | None = None  # what done() found, until the next write

    def check_stamp(self, stamp: dict[str, Any], earlier: Callable[[], dict[str, Any] | None] | None = None) -> None:
        """Record what the job is (input, model, settings), or check that the parts come from the same job.

        ``earlier()``: the same job as an earlier version of genrnn stamped it, if that
        version decoded it alike; its parts are taken over (and the stamp rewritten)
        rather than refused. Asked only when the recorded stamp is not ``stamp``.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / STAMP
        if path.is_file():
            try:
                recorded = json.loads(path.read_text())
            except ValueError:
                raise GenrnnError(f"{path} is not a job's record; remove {self.directory} to start afresh") from None
            if recorded == stamp:
                return
            if earlier is None or recorded != earlier():
                raise GenrnnError(
                    f"{self.directory} holds the parts of a different job (input, model or decoding settings "
                    f"changed); remove it to start afresh"
                )
        elif self._part_paths():  # parts are only ever written after the stamp: whose job made these is unknown
            raise GenrnnError(f"{self.directory} holds parts but no {STAMP}; remove it to start afresh")
        write_atomically(path, json.dumps(stamp, indent=2) + "\n")  # several ranks may write it at once

    def made_by_another_job(self, stamp: dict[str, Any]) -> bool:
        """Whether the output says that a job other than ``stamp``'s merged it.

        An output without the mark (merged by an earlier version, copied, or on a file
        system without extended attributes) says nothing.
        """
        try:
            return os.getxattr(self.output, JOB_ATTRIBUTE) != _stamp_digest(stamp)
        except (OSError, AttributeError):  # no mark, or no extended attributes (AttributeError: not Linux)
            return False

    def merged(self) -> bool:
        """Whether the output is in place and the parts merged into it: a kill cut the cleanup short."""
        if not (self.output.is_file() and self.directory.is_dir()):
            return False
        return (self.directory / MERGED).exists() or not self._part_paths()

    def _mark(self, path: Path) -> None:
        """Mark ``path`` with the digest of the job's stamp, where the file system keeps such marks."""
        recorded = self.directory / STAMP
        if not recorded.is_file():  # parts written without a stamp (bench/merge_memory.py's): no job to name
            return
        try:
            os.setxattr(path, JOB_ATTRIBUTE, _stamp_digest(json.loads(recorded.read_text())))
        except (OSError, AttributeError):  # no extended attributes here: a rerun then cannot tell
            pass

    def _part_paths(self) -> list[Path]:
        return sorted(self.directory.glob("part-*.jsonl"))

    @staticmethod
    def _whole_lines(path: Path) -> Iterator[tuple[int, str, int]]:
        """``(index, json, end offset)`` of each whole line; stops at the first half-written one."""
        offset = 0
        with path.open("rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    return
                try:
                    index, text = raw.decode("utf-8").rstrip("\n").split("\t", 1)
                    json.loads(text)
                    yield int(index), text, offset + len(raw)
                except ValueError:
                    return
                offset += len(raw)

    def done(self, total: int) -> bytearray:
        """For each of the job's ``total`` indices, whether its item is already in a part (a byte each).

        The parts are read once until the next write: the pending batches and the writer both
        ask as a resumed job starts, and each line is parsed (seconds a million lines).
        """
        if self._done is None or len(self._done) != total:
            self._done = bytearray(total)
            if self.directory.is_dir():
                for path in self._part_paths():
                    for index, _, _ in self._whole_lines(path):
                        if 0 <= index < total:
                            self._done[index] = 1
        return bytearray(self._done)  # a copy: the caller's to keep

    def open_part(self, rank: int) -> TextIO:
        """The rank's part, opened for appending after cutting off a half-written last line."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"part-{rank}.jsonl"
        if path.is_file():
            whole = 0
            for _, _, end in self._whole_lines(path):
                whole = end
            if whole < path.stat().st_size:
                os.truncate(path, whole)
        return path.open("a", encoding="utf-8")

    def _line_starts(self, paths: list[Path], total: int, extra: dict[int, Any]) -> _LineStarts:
        """Where each index's line starts in the parts; every index not in ``extra`` must be there."""
        where = _LineStarts(part=array("I", [0]) * total, offset=array("q", [-1]) * total)
        for number, path in enumerate(paths):
            start = 0
            for index, _, end in self._whole_lines(path):
                if 0 <= index < total and where.offset[index] < 0:  # a rerun may have written an index twice
                    where.part[index], where.offset[index] = number, start
                start = end
        missing = sum(1 for index in range(total) if where.offset[index] < 0 and index not in extra)
        if missing:
            raise GenrnnError(f"{missing} items are missing from {self.directory}; rerun to finish them")
        return where

    def write(self, part: TextIO, results: list[tuple[int, dict[str, Any]]]) -> None:
        """Append results and push them to disk, so that a kill loses at most the batch in flight."""
        self._done = None
        part.write("".join(f"{index}\t{json.dumps(record, ensure_ascii=False)}\n" for index, record in results))
        part.flush()
        os.fsync(part.fileno())

    def merge(self, total: int, extra: dict[int, dict[str, Any]]) -> None:
        """Write the output in input order from the parts and ``extra`` records, then remove the parts.

        The records are not held in memory: a first pass notes where each index's line
        starts, and the output is copied from the parts (mapped, so the OS pages them). A
        part found changed since is refused (a part cut short under the map kills the
        process with SIGBUS: nothing but another program changes the parts meanwhile).
        """
        paths = self._part_paths()
        where = self._line_starts(paths, total, extra)
        # Among the job's own files, beside the output (the rename moves no data): never an input's name.
        temporary = self.directory / MERGING
        with _MappedParts(paths) as parts, temporary.open("wb") as out:
            for index in range(total):
                if index in extra:
                    out.write(json.dumps(extra[index], ensure_ascii=False).encode("utf-8") + b"\n")
                else:
                    out.write(parts.line(where.part[index], where.offset[index], index))
            out.flush()
            os.fsync(out.fileno())
        self._mark(temporary)
        os.replace(temporary, self.output)
        # From here a rerun takes the output as whole, however much of the cleanup a kill cut
        # short (it would otherwise decode again the items of the parts already removed).
        (self.directory / MERGED).touch()
        # The stamp goes last, so that a kill in between never leaves parts without it.
        for path in self._part_paths():
            path.unlink()
        shutil.rmtree(self.directory)
