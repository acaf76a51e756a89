"""Memory and time of a batch job's last step, the merge of its part files, against holding every record in memory.

    python bench/merge_memory.py [--items 1000000,3000000]

Writes part files as a job of N items would (one rank, the items in a shuffled order, as
jobs write them sorted by length), then merges them with ``PartStore.merge`` and with
the reference: read every record into a dict, then write them in input order (genrnn's
merge before it mapped the parts). Each runs in a process of its own, so that one's memory does
not count towards the other's; the table gives the growth of each process's anonymous
memory (``RssAnon``: pages of the files it maps are the OS's to drop, not the job's)
during the merge, sampled every millisecond by another process, and the merge's wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine  # the script's own directory is on the path

from serving.batch_parts import PartStore

VARIANTS = ("reference: every record in a dict", "genrnn: line offsets, parts mapped")


# Run in a process of its own: a thread of the measured process would wait for the interpreter's
# lock while the work holds it, and miss brief peaks (it read a third to a half low).
SAMPLER = """
import select, sys
def anonymous_kib():
    with open(f"/proc/{sys.argv[1]}/status") as lines:
        return next(int(line.split()[1]) for line in lines if line.startswith("RssAnon:"))
peak = anonymous_kib()
print("ready", flush=True)
while not select.select([sys.stdin], [], [], 0.001)[0]:
    peak = max(peak, anonymous_kib())
print(max(peak, anonymous_kib()))  # the last moment too
"""


def anonymous_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("this benchmark reads /proc/self/status (Linux)")


class AnonymousGrowth:
    """The most this process's anonymous memory grows (MiB) while the ``with`` block runs, sampled every
    millisecond by another process."""

    def __enter__(self) -> AnonymousGrowth:
        self.start, self.peak = anonymous_mib(), 0.0
        command = [sys.executable, "-c", SAMPLER, str(os.getpid())]
        self.sampler = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.sampler.stdout.readline() != "ready\n":  # sampling from here on
            raise SystemExit("the memory sampler did not start (it reads /proc/PID/status: Linux)")
        return self

    def __exit__(self, *exc: object) -> None:
        said = self.sampler.communicate("stop\n")[0]  # the rest of its output: the peak
        if self.sampler.returncode != 0 or not said.strip().isdigit():
            raise SystemExit(f"the memory sampler failed (exit {self.sampler.returncode}): {said!r}")
        self.peak = int(said) / 1024 - self.start


def record(index: int) -> dict:
    """A G2P greedy job's record: about 160 bytes of JSON."""
    tokens = [5, 9, 12, 33, 7, 8, 2]
    candidate = {"text": "K AE1 T S IH0 Z", "tokens": tokens, "logprob": -0.0812345, "finish_reason": "eos"}
    return {"id": index, "input": f"WORD{index}", "candidates": [candidate]}


def reference_merge(store: PartStore, total: int) -> None:
    """The merge that holds every record's text in memory (lines checked whole, output synced, as genrnn's)."""
    lines: dict[int, str] = {}
    for path in sorted(store.directory.glob("part-*.jsonl")):
        for index, text, _ in PartStore._whole_lines(path):
            lines.setdefault(index, text)
    with store.output.open("w", encoding="utf-8") as out:
        for index in range(total):
            out.write(lines[index] + "\n")
        out.flush()
        os.fsync(out.fileno())


def measure(variant: int, items: int, directory: Path) -> None:
    """In this process: write the parts, merge them, print ``seconds peak_mib``."""
    store = PartStore(directory / "out.jsonl")
    store.directory.mkdir(parents=True)
    order = list(range(items))
    random.Random(0).shuffle(order)
    with (store.directory / "part-0.jsonl").open("w", encoding="utf-8") as part:
        for index in order:
            part.write(f"{index}\t{json.dumps(record(index))}\n")
    del order
    with AnonymousGrowth() as growth:
        began = time.perf_counter()
        if variant == 0:
            reference_merge(store, items)
        else:
            store.merge(items, {})
        seconds = time.perf_counter() - began
    print(f"{seconds} {growth.peak} {store.output.stat().st_size / 2**20}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", default="1000000,3000000", help="job sizes, comma-separated")
    parser.add_argument("--measure", nargs=2, type=int, help=argparse.SUPPRESS)  # VARIANT ITEMS, in a child
    args = parser.parse_args()
    if args.measure:
        with tempfile.TemporaryDirectory() as directory:
            measure(*args.measure, Path(directory))
        return
    print(f"machine: {machine()}")
    print("| items | merge | seconds | anonymous memory at peak | output |\n| ---: | --- | ---: | ---: | ---: |")
    for items in (int(n) for n in args.items.split(",")):
        for variant, name in enumerate(VARIANTS):
            child = [sys.executable, __file__, "--measure", str(variant), str(items)]
            seconds, peak, size = map(float, subprocess.run(child, check=True, capture_output=True).stdout.split())
            print(f"| {items:,} | {name} | {seconds:.1f} | {peak:,.0f} MiB | {size:,.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
