"""Memorisation statistics on hand-made token lists with known answers."""

import pytest

from analysis.memorisation import contains_passage_at_k, longest_common_ngram, passage_coverage


def test_longest_common_ngram():
    assert longest_common_ngram([1, 2, 3, 4, 5], [3, 4, 5]) == 3
    assert longest_common_ngram([1, 2, 9, 4, 5], [2, 3, 4, 5]) == 2  # "4 5"
    assert longest_common_ngram([7, 7, 7], [7, 7]) == 2
    assert longest_common_ngram([1, 2], [3]) == 0 and longest_common_ngram([], [1]) == 0


def test_coverage_and_contains():
    coverage = passage_coverage([[0, 3, 4, 5, 0], [3, 4], [9]], [3, 4, 5])
    assert coverage.tolist() == pytest.approx([1.0, 2 / 3, 0.0])
    assert contains_passage_at_k(coverage, 1) and not contains_passage_at_k(coverage[1:], 2)
    with pytest.raises(ValueError, match="no tokens"):
        passage_coverage([[1]], [])
