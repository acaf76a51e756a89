"""Where the G2P targets stand: for each kind of system, dev's choice among every run given.

    python bench/g2p_standing.py runs/g014b2b-h200 runs/g014b2b-h200-cosine ...

Reads every ``results.json`` (``bench/g2p_benchmark.py``'s) under the directories,
sorts them into the issue's three kinds — one model without attention, one model
with attention, several decoded as one ensemble — and for each kind takes the run
and decoding with the lowest dev WER among all of them, then prints its test
figures against the target: BENCHMARKS.md's first table. Test figures play no part
in the choice. Every result must have scored the same number of dev and test words:
the choice across runs is fair only on one dev set.

Below the table, for each kind: how far dev's choice is ahead of the best other run
on dev, word by word where both runs kept their outputs (``outputs.json``), with the
standard error of that paired difference, and the standard error of the chosen test
WER: how much of a lead, or of a miss, the 5,120 dev and 12,000 test words can tell.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

# kind → (WER, PER) on the test words, at most
TARGETS = {
    "no attention": (0.240, 0.059),
    "attention, single model": (0.210, 0.050),
    "ensemble": (0.200, 0.047),
}


@dataclass(frozen=True)
class Candidate:
    """One decoding of one run."""

    run: str
    mode: str
    scores: dict[str, dict[str, float]]  # split → metric → value
    words: dict[str, int]  # split → words scored

    @property
    def dev_wer(self) -> float:
        return self.scores["dev"]["wer"]

    def dev_right(self) -> tuple[list[str], str] | None:
        """The dev words and, for each, whether this decoding got it right ("1") or not; None if not kept."""
        path = Path(self.run) / "outputs.json"
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        return record["words"]["dev"], record["right"][self.mode]["dev"]


@dataclass(frozen=True)
class Paired:
    """Two decodings of the same words, word by word."""

    only_first: int  # words the first gets right and the second wrong
    only_second: int
    words: int

    @property
    def standard_error(self) -> float:
        """Of the two WERs' difference, the mean of per-word differences in {-1, 0, 1}."""
        discordant, net = self.only_first + self.only_second, self.only_second - self.only_first
        return math.sqrt(max(discordant - net * net / self.words, 0.0)) / self.words


def paired(first: Candidate, second: Candidate) -> Paired | None:
    """The two decodings compared on dev word by word; None unless both kept their outputs for the same words."""
    a, b = first.dev_right(), second.dev_right()
    if a is None or b is None or a[0] != b[0]:
        return None
    only_first = sum(x == "1" and y == "0" for x, y in zip(a[1], b[1]))
    only_second = sum(x == "0" and y == "1" for x, y in zip(a[1], b[1]))
    return Paired(only_first, only_second, len(a[0]))


def kind(results: dict) -> str:
    """Which target a run answers to: an ensemble, or one model with or without attention."""
    if "," in results["config"]:  # scored with --model A,B
        return "ensemble"
    model = results["training"]["config"]["model"]
    return "no attention" if model["attention"] == "none" else "attention, single model"


def read_runs(directories: list[Path]) -> dict[str, list[Candidate]]:
    """Every decoding of every run under the directories, by kind."""
    by_kind: dict[str, list[Candidate]] = {name: [] for name in TARGETS}
    words = None
    for directory in directories:
        for path in sorted(directory.rglob("results.json")):
            results = json.loads(path.read_text())
            if "words" not in results:
                raise SystemExit(f"{path} does not say how many words it scored (an older benchmark's): leave it out")
            if words is None:
                words = results["words"]
            elif results["words"] != words:
                raise SystemExit(f"{path} scored {results['words']} words, the others {words}: not one split")
            run = str(path.parent)
            for mode, scores in results["scores"].items():
                by_kind[kind(results)].append(Candidate(run, mode, scores, results["words"]))
    return by_kind


def dev_choice(candidates: list[Candidate]) -> Candidate:
    """The lowest dev WER; on a tie, the one read first."""
    return min(candidates, key=lambda candidate: candidate.dev_wer)


def stated(target: tuple[float, float]) -> str:
    """A target as BENCHMARKS.md writes it: ``≤ 24.0 / 5.9 %``."""
    return f"≤ {target[0] * 100:.1f} / {target[1] * 100:.1f} %"


def verdict(wer: float, per: float, target: tuple[float, float]) -> str:
    """The target, and each figure that misses it by how much (points)."""
    missed = [
        f"{name} missed by {(value - limit) * 100:.2f}"
        for name, value, limit in (("WER", wer, target[0]), ("PER", per, target[1]))
        if value > limit
    ]
    return f"{stated(target)}: " + ("; ".join(missed) if missed else "**met**")


def table(by_kind: dict[str, list[Candidate]]) -> list[str]:
    """BENCHMARKS.md's table of where the targets stand."""
    rows = [
        "| configuration | dev's choice | dev WER | test WER | test PER | target (WER / PER) |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for name, target in TARGETS.items():
        if not by_kind[name]:
            rows.append(f"| {name} | no run | | | | {stated(target)} |")
            continue
        chosen = dev_choice(by_kind[name])
        test = chosen.scores["test"]
        rows.append(
            f"| {name} | `{chosen.run}`, {chosen.mode} | {chosen.dev_wer:.2%} | {test['wer']:.2%} | "
            f"{test['per']:.2%} | {verdict(test['wer'], test['per'], target)} |"
        )
    return rows


def binomial_error(rate: float, words: int) -> float:
    """The standard error of a rate measured on ``words`` independent words."""
    return math.sqrt(rate * (1 - rate) / words)


def margins(by_kind: dict[str, list[Candidate]]) -> list[str]:
    """For each kind, dev's choice against the best other run, and the chosen test WER's standard error."""
    lines = []
    for name, candidates in by_kind.items():
        if not candidates:
            continue
        chosen = dev_choice(candidates)
        test_wer = chosen.scores["test"]["wer"]
        test = f"test WER {test_wer:.2%} ± {binomial_error(test_wer, chosen.words['test']) * 100:.2f}"
        others = [c for c in candidates if c.run != chosen.run]
        if not others:
            lines.append(f"- {name}: the only run; {test}")
            continue
        other = dev_choice(others)
        lead = f"{(other.dev_wer - chosen.dev_wer) * 100:.2f} points of dev WER ahead of `{other.run}`, {other.mode}"
        pair = paired(chosen, other)
        if pair is not None:
            lead += (
                f" (± {pair.standard_error * 100:.2f}, paired: {pair.only_first} words right in the choice alone, "
                f"{pair.only_second} in the other alone)"
            )
        lines.append(f"- {name}: {lead}; {test}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directories", nargs="+", type=Path, help="run directories (searched for results.json)")
    args = parser.parse_args()
    missing = [str(directory) for directory in args.directories if not directory.is_dir()]
    if missing:
        sys.exit(f"no such directory: {', '.join(missing)}")
    by_kind = read_runs(args.directories)
    print("\n".join(table(by_kind)))
    print("\nHow far ahead each choice is (± one standard error):")
    print("\n".join(margins(by_kind)))


if __name__ == "__main__":
    main()
