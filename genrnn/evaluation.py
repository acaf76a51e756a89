"""Scoring a model on examples: decode every source, compare the 1-best output with its references."""

from __future__ import annotations

from collections.abc import Sequence

from genrnn.config import DecodingConfig
from genrnn.data import Example
from genrnn.decoding import Generator
from genrnn.metrics import Scores, score


def evaluate(
    generator: Generator, examples: Sequence[Example], settings: DecodingConfig, batch_size: int = 256
) -> Scores:
    """WER, PER and the rest for the generator's best output on each example, in batches of similar length."""
    generations = generator.generate_sorted([e.source for e in examples], settings, batch_size)
    return score([g.candidates[0].text for g in generations], [e.targets for e in examples])
