"""Scores as the G2P literature computes them, on whitespace-separated tokens.

A word is right when the output equals any of its references (WER, sequence
accuracy); the token error rate (PER for phonemes) is the edit distance to the
closest reference, summed over words, over the summed length of those references.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions) between token lists."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


@dataclass(frozen=True)
class Scores:
    """Rates are fractions in [0, 1] (PER may exceed 1 for very long outputs)."""

    wer: float
    per: float
    sequence_accuracy: float
    items: int

    def to_dict(self) -> dict:
        return asdict(self)


def score(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> Scores:
    """WER, PER and sequence accuracy of 1-best outputs against every accepted reference."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    if not hypotheses:
        raise ValueError("nothing to score")
    correct = errors = length = 0
    for hypothesis, refs in zip(hypotheses, references):
        tokens = hypothesis.split()
        ref_tokens = [r.split() for r in refs]
        correct += any(tokens == r for r in ref_tokens)
        distance, closest = min((edit_distance(tokens, r), len(r)) for r in ref_tokens)
        errors += distance
        length += closest
    accuracy = correct / len(hypotheses)
    return Scores(wer=1.0 - accuracy, per=errors / max(length, 1), sequence_accuracy=accuracy, items=len(hypotheses))
