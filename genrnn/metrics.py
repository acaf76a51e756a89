"""Scores as the G2P literature computes them, on whitespace-separated tokens.

A word is right when the output equals any of its references (WER, sequence
accuracy); the token error rate (PER for phonemes) is the edit distance to the
closest reference, summed over words, over the summed length of those references. Of
two references as close, the shorter counts: the higher rate, where the rules say nothing.
For tasks whose outputs are sentences, corpus BLEU (4-grams, brevity penalty) and
chrF (character 6-grams, β = 2) are reported as well.
"""

from __future__ import annotations

import math
from collections import Counter
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
    bleu: float = 0.0
    chrf: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def is_right(hypothesis: str, references: Sequence[str]) -> bool:
    """Whether a 1-best output counts as right: its tokens equal one of the references'."""
    tokens = hypothesis.split()
    return any(tokens == r.split() for r in references)


@dataclass(frozen=True)
class ErrorCounts:
    """The sums that WER, PER and sequence accuracy are made of: shards of a test set add up."""

    right: int  # outputs equal to one of their references
    edits: int  # edit distances to the closest references
    reference_tokens: int  # the lengths of those references
    items: int

    @property
    def sequence_accuracy(self) -> float:
        return self.right / self.items

    @property
    def wer(self) -> float:
        return 1.0 - self.sequence_accuracy

    @property
    def per(self) -> float:
        return self.edits / max(self.reference_tokens, 1)


def error_counts(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> ErrorCounts:
    """Right outputs and edits to the closest reference, of 1-best outputs against every accepted reference."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    right = edits = length = 0
    for hypothesis, refs in zip(hypotheses, references):
        tokens = hypothesis.split()
        right += is_right(hypothesis, refs)
        distance, closest = min((edit_distance(tokens, r), len(r)) for r in map(str.split, refs))
        edits += distance
        length += closest
    return ErrorCounts(right, edits, length, len(hypotheses))


def score(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> Scores:
    """WER, PER and sequence accuracy of 1-best outputs against every accepted reference, BLEU and chrF."""
    if not hypotheses:
        raise ValueError("nothing to score")
    counts = error_counts(hypotheses, references)
    return Scores(
        wer=counts.wer,
        per=counts.per,
        sequence_accuracy=counts.sequence_accuracy,
        items=counts.items,
        bleu=bleu(hypotheses, references),
        chrf=chrf(hypotheses, references),
    )


def _ngrams(items: Sequence[str], n: int) -> Counter:
    return Counter(tuple(items[i : i + n]) for i in range(len(items) - n + 1))


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], order: int = 4) -> float:
    """Corpus BLEU in [0, 1]: clipped n-gram precisions over all references, closest-length brevity penalty."""
    matches, totals = [0] * order, [0] * order
    hypothesis_length = reference_length = 0
    for hypothesis, refs in zip(hypotheses, references):
        tokens, ref_tokens = hypothesis.split(), [r.split() for r in refs]
        hypothesis_length += len(tokens)
        reference_length += min((abs(len(r) - len(tokens)), len(r)) for r in ref_tokens)[1]
        for n in range(1, order + 1):
            counts = _ngrams(tokens, n)
            most = Counter()
            for r in ref_tokens:
                most |= _ngrams(r, n)
            matches[n - 1] += sum(min(c, most[g]) for g, c in counts.items())
            totals[n - 1] += max(len(tokens) - n + 1, 0)
    if min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / order
    brevity = min(0.0, 1.0 - reference_length / max(hypothesis_length, 1))
    return math.exp(log_precision + brevity)


def _chrf_stats(hypothesis: str, reference: str, order: int) -> list[tuple[int, int, int]]:
    """Per character n-gram order: (matches, hypothesis n-grams, reference n-grams), spaces ignored."""
    h, r = hypothesis.replace(" ", ""), reference.replace(" ", "")
    stats = []
    for n in range(1, order + 1):
        hc, rc = _ngrams(h, n), _ngrams(r, n)
        stats.append((sum((hc & rc).values()), sum(hc.values()), sum(rc.values())))
    return stats


def _f_beta(stats: Sequence[tuple[int, int, int]], beta: float) -> float:
    """chrF from summed statistics: precision and recall averaged over the orders, then F-beta."""
    usable = [(m / h, m / r) for m, h, r in stats if h and r]
    if not usable:
        return 0.0
    precision = sum(p for p, _ in usable) / len(usable)
    recall = sum(r for _, r in usable) / len(usable)
    if precision + recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (beta**2 * precision + recall)


def chrf(hypotheses: Sequence[str], references: Sequence[Sequence[str]], order: int = 6, beta: float = 2.0) -> float:
    """Corpus chrF in [0, 1], each hypothesis scored against its best-matching reference."""
    totals = [[0, 0, 0] for _ in range(order)]
    for hypothesis, refs in zip(hypotheses, references):
        candidates = [_chrf_stats(hypothesis, r, order) for r in refs]
        best = max(candidates, key=lambda stats: _f_beta(stats, beta))
        for total, stat in zip(totals, best):
            for i in range(3):
                total[i] += stat[i]
    return _f_beta([tuple(t) for t in totals], beta)
