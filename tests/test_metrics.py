"""WER, PER and sequence accuracy as the G2P literature computes them."""

from __future__ import annotations

import math

import pytest

from genrnn.metrics import bleu, chrf, edit_distance, score


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


def test_bleu_and_chrf_are_one_for_exact_output_and_fall_with_errors():
    references = [["the cat sat on the mat"], ["a dog ran in the park today"]]
    exact = ["the cat sat on the mat", "a dog ran in the park today"]
    assert bleu(exact, references) == pytest.approx(1.0) and chrf(exact, references) == pytest.approx(1.0)
    worse = ["the cat sat on a mat", "a dog ran in the park"]
    assert 0.0 < bleu(worse, references) < 1.0 and 0.0 < chrf(worse, references) < 1.0
    assert bleu(["x y z"], [["a b c"]]) == 0.0


def test_bleu_brevity_penalty_and_clipping():
    # "the the the" matches "the" at most twice (clipping); a short output pays the brevity penalty.
    assert bleu(["the the the the"], [["the cat the mat"]], order=1) == pytest.approx(0.5)
    assert bleu(["the cat"], [["the cat sat down"]], order=2) == pytest.approx(math.exp(1 - 4 / 2))


def test_chrf_takes_the_best_reference():
    assert chrf(["K AE1 T"], [["D AO1 G", "K AE1 T"]]) == pytest.approx(1.0)
