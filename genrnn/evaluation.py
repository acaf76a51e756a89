"""Scoring a model on examples: decode every source, compare the 1-best output with its references."""

from __future__ import annotations

from collections.abc import Sequence

from genrnn.config import DecodingConfig
from genrnn.data import Example
from genrnn.decoding import Generator
from genrnn.metrics import Scores, score


def best_outputs(
    generator: Generator, sources: Sequence[str], settings: DecodingConfig, batch_size: int | None = None
) -> list[str]:
    """The generator's best output for each source, in input order, decoded in batches of similar length.

    ``batch_size`` defaults to 256 inputs on a CPU, where larger batches gain little, and
    to 1,024 on a GPU, where a decoding step costs little more for more rows.
    """
    if batch_size is None:
        batch_size = 1024 if generator.device.type == "cuda" else 256
    return [g.candidates[0].text for g in generator.generate_sorted(sources, settings, batch_size)]


def evaluate(
    generator: Generator, examples: Sequence[Example], settings: DecodingConfig, batch_size: int | None = None
) -> Scores:
    """WER, PER and the rest for the generator's best output on each example (see :func:`best_outputs`)."""
    outputs = best_outputs(generator, [e.source for e in examples], settings, batch_size)
    return score(outputs, [e.targets for e in examples])
