"""Memory and time of a batch job's reading of its input file, against holding every item in memory.

    python bench/input_memory.py [--items 1000000,3000000]

Writes an input of N one-word lines (plain text, and TSV with an id on each line), then, in
another process, reads it as a job does (every line checked, the job's stamp digested,
the items sorted by length into batches of 256) once with ``scan_items`` and
``owned_batches``, which keep a few bytes an item and read each batch's items again from
the file when it is decoded, and once with the reference: every ``Item`` held, the
stamp's digest taken of the whole list of records, the batches lists of items (genrnn's
reading before the table).
Each runs in a process of its own; the table gives the growth of the process's anonymous
memory while it reads (sampled every millisecond by another process), the reading's
wall-clock time, and for the table the time to read back a batch of 256 items (the cost
each batch pays later).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine  # the script's own directory is on the path
from merge_memory import AnonymousGrowth

from genrnn.config import DecodingConfig
from genrnn.data import numbered_lines
from serving.batch import owned_batches
from serving.batch_input import Item, ItemId, _LineReader, scan_items

VARIANTS = ("reference: every item held", "genrnn: a table of offsets")
FORMATS = ("text", "tsv")
BATCH = 256


def write_input(path: Path, items: int, tsv: bool) -> None:
    """N lines of one word each, 3 to 12 lowercase letters, with an id before each in a TSV."""
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as file:
        for i in range(items):
            word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 12)))
            file.write(f"w{i}\t{word}\n" if tsv else word + "\n")


def reference_read(path: Path) -> list[list[Item]]:
    """Every item in a list, every id in a dict, the stamp's digest of the whole list of records, and the
    batches: a job's reading of its input before the table (the lines checked by the same code)."""
    reader = _LineReader.of(path, DecodingConfig())
    items: list[Item] = []
    lines_of: dict[ItemId, int] = {}
    for number, raw in numbered_lines(path):
        fields = reader.fields(raw)
        if fields is None:
            continue
        given, source, overrides = fields
        item_id = number if given is None else given
        if item_id in lines_of:
            raise SystemExit(f"{path}:{number}: a duplicate id")
        items.append(reader.item(len(items), number, item_id, source, overrides))
        lines_of[item_id] = number
    records = [[i.index, i.id, i.source, vars(i.settings)] for i in items]
    hashlib.sha256(json.dumps(records, ensure_ascii=False).encode()).hexdigest()
    del records
    ordered = sorted(items, key=lambda item: (len(item.source), item.index))
    return [ordered[start : start + BATCH] for start in range(0, len(ordered), BATCH)]


def measure(variant: int, path: Path) -> None:
    """In this process: read the input, print ``seconds peak_mib ms_per_batch``."""
    with AnonymousGrowth() as growth:
        began = time.perf_counter()
        if variant:
            table = scan_items(path, DecodingConfig())
            batches = owned_batches(table, BATCH, 0, 1)
        else:
            batches = reference_read(path)
        seconds = time.perf_counter() - began
    per_batch = float("nan")
    if variant:  # the first 400 batches by length, as a job decodes them
        began = time.perf_counter()
        first = min(400, len(batches))
        for number in range(first):
            table.items(batches[number])
        per_batch = (time.perf_counter() - began) / first * 1000
    print(f"{seconds} {growth.peak} {per_batch}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", default="1000000,3000000", help="input sizes, comma-separated")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # VARIANT PATH, in a child
    args = parser.parse_args()
    if args.measure:
        measure(int(args.measure[0]), Path(args.measure[1]))
        return
    print(f"machine: {machine()}")
    print(f"| items | input | reading | seconds | anonymous memory at peak | a batch of {BATCH} read back |")
    print("| ---: | --- | --- | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as directory:
        for items in (int(n) for n in args.items.split(",")):
            for tsv, form in enumerate(FORMATS):
                path = Path(directory) / ("in.tsv" if tsv else "in.txt")
                write_input(path, items, bool(tsv))  # here, so that a child's memory holds nothing of it
                for variant, name in enumerate(VARIANTS):
                    child = [sys.executable, __file__, "--measure", str(variant), str(path)]
                    out = subprocess.run(child, check=True, capture_output=True).stdout.split()
                    seconds, peak, per_batch = map(float, out)
                    again = f"{per_batch:.2f} ms" if variant else "—"
                    print(f"| {items:,} | {form} | {name} | {seconds:.1f} | {peak:,.0f} MiB | {again} |", flush=True)


if __name__ == "__main__":
    main()
