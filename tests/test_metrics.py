"""WER, PER and sequence accuracy as the G2P literature computes them."""

from __future__ import annotations

import pytest

from genrnn.metrics import edit_distance, score


def test_edit_distance():
    assert edit_distance("kitten".split("t"), "kitten".split("t")) == 0
    assert edit_distance(list("kitten"), list("sitting")) == 3
    assert edit_distance([], list("abc")) == 3


def test_a_word_is_right_when_it_matches_any_reference():
    scores = score(["R EH1 D", "K AE1 T", "D AO1 G"], [["R IY1 D", "R EH1 D"], ["K AE1 T S"], ["D AO1 G"]])
    assert scores.wer == pytest.approx(1 / 3)
    assert scores.sequence_accuracy == pytest.approx(2 / 3)
    # PER: distance to the closest reference over that reference's length: (0 + 1 + 0) / (3 + 4 + 3)
    assert scores.per == pytest.approx(1 / 10)
    assert scores.items == 3


def test_closest_reference_sets_the_denominator():
    scores = score(["A B"], [["A B C D E F", "A X"]])
    assert scores.per == pytest.approx(1 / 2)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError):
        score(["a"], [])
