"""The ||a||_2 / ||a||_1 rule on vectors with exactly known ratios."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.spurious import concentration_ratio, is_spurious, split_spurious


def test_one_hot_is_ratio_one_and_flagged():
    a = np.zeros(9)
    a[4] = -0.3  # sign does not matter
    assert concentration_ratio(a) == pytest.approx(1.0)
    assert bool(is_spurious(a))


def test_uniform_over_nine_tokens_is_one_third_and_kept():
    assert concentration_ratio(np.full(9, 0.2)) == pytest.approx(1 / 3)
    assert not bool(is_spurious(np.full(9, 0.2)))


def test_exact_cases_and_batch_shape():
    batch = np.array([[3.0, 4.0, 0.0, 0.0],    # 5 / 7
                      [1.0, -1.0, 1.0, -1.0],  # 2 / 4
                      [2.0, 1.0, 0.0, 0.0],    # sqrt(5) / 3 = 0.745
                      [0.0, 0.0, 0.0, 0.0]])   # undefined
    ratio = concentration_ratio(batch.reshape(2, 2, 4))
    assert ratio.shape == (2, 2)
    assert ratio.ravel()[:3] == pytest.approx([5 / 7, 0.5, np.sqrt(5) / 3])
    assert np.isnan(ratio.ravel()[3])
    assert is_spurious(batch).tolist() == [True, False, True, False]
    assert not bool(is_spurious([3.0, 4.0], threshold=5 / 7))  # the rule is strict: ratio == threshold is kept
    assert bool(is_spurious([1.0, 1.0]))  # 1/sqrt(2) > 2/3: sequences of two tokens are always flagged


def test_split_a_table_of_top_sequences():
    table = pd.DataFrame({"sequence": ["a", "b", "c", "d"], "score": [0.9, 0.8, 0.7, 0.6],
                          "token_scores": [[0.0, 0.9, 0.0], [0.2, 0.3, 0.3], [3.0, 4.0], [0.1] * 9]},
                         index=[10, 11, 12, 13])
    kept, flagged, n_flagged = split_spurious(table)
    assert n_flagged == 2
    assert flagged["sequence"].tolist() == ["a", "c"] and flagged.index.tolist() == [10, 12]
    assert kept["sequence"].tolist() == ["b", "d"]
    assert kept["l2_over_l1"].tolist() == pytest.approx([np.sqrt(0.22) / 0.8, 1 / 3])
    assert "l2_over_l1" not in table.columns  # input left alone


def test_split_refuses_missing_column_and_empty_rows():
    with pytest.raises(ValueError, match="no column"):
        split_spurious(pd.DataFrame({"x": [1]}))
    with pytest.raises(ValueError, match="row 'q'"):
        split_spurious(pd.DataFrame({"token_scores": [[]]}, index=["q"]))
