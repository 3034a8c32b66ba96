"""Token-overlap statistics on hand-made token lists."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.overlap import (content_tokens, overlap_vs_baseline, query_overlap, query_overlaps,
                              zero_overlap_share)

STOP = {0, 1}  # e.g. "the", "of"


def test_query_overlap_counts_distinct_content_tokens():
    query = [0, 5, 6, 7, 7, 1]  # content {5, 6, 7}
    assert content_tokens(query, STOP) == {5, 6, 7}
    assert query_overlap([9, 5, 5, 5, 0, 1], query, STOP) == pytest.approx(1 / 3)  # repeats count once
    assert query_overlap([7, 6, 5], query, STOP) == 1.0
    assert query_overlap([0, 1, 2], query, STOP) == 0.0  # stop tokens do not count
    assert query_overlap([0, 1, 2], query) == pytest.approx(2 / 5)  # without a stop list: {0, 1, 5, 6, 7}
    assert query_overlap(["water", "is"], ["water", "hydrogen"], {"is"}) == 0.5  # string tokens work too
    assert query_overlaps([np.array([5, 6]), [], [7]], query, STOP).tolist() == pytest.approx([2 / 3, 0.0, 1 / 3])
    with pytest.raises(ValueError, match="no content tokens"):
        query_overlap([5], [0, 1], STOP)


def test_top_k_versus_baseline_difference():
    result = overlap_vs_baseline([1.0, 1.0, 0.5], [0.5, 0.0, 0.0], n_resamples=500)
    assert (result.top_mean, result.baseline_mean) == pytest.approx((5 / 6, 1 / 6))
    assert result.difference == pytest.approx(2 / 3)
    assert result.ci_low <= result.difference <= result.ci_high
    assert result.ci_low >= 1 / 3 - 1e-12 and result.ci_high <= 1.0 + 1e-12  # bounds of any resampled difference
    constant = overlap_vs_baseline([1.0, 1.0, 1.0], [0.0, 0.0], n_resamples=200)
    assert (constant.difference, constant.ci_low, constant.ci_high) == (1.0, 1.0, 1.0)


def test_paired_baseline_resamples_pairs():
    top = np.array([0.2, 0.5, 0.9, 0.4])
    paired = overlap_vs_baseline(top, top - 0.1, paired=True, n_resamples=200)
    assert (paired.ci_low, paired.ci_high) == pytest.approx((0.1, 0.1))  # every pair differs by exactly 0.1
    unpaired = overlap_vs_baseline(top, top - 0.1, n_resamples=200)
    assert unpaired.ci_high - unpaired.ci_low > 0.1
    with pytest.raises(ValueError, match="differ in length"):
        overlap_vs_baseline(top, top[:3], paired=True)


def test_zero_overlap_share_of_top_k():
    completion = [0, 20, 21]  # content {20, 21}
    sequences = [[20, 3], [4, 5], [21], [0, 6], [20], [7]]
    influences = [5.0, 3.0, 1.0, 1.0, -2.0, 0.5]
    # top 4 by influence: rows 0 (overlap), 1 (none), 2 (overlap), 3 (only a stop token: none)
    result = zero_overlap_share(influences, sequences, completion, k=4, stop_tokens=STOP)
    assert result.share == pytest.approx((3.0 + 1.0) / 10.0)
    assert (result.n_zero_overlap, result.n_positive, result.total_positive_influence) == (2, 4, 10.0)
    everything = zero_overlap_share(influences, sequences, completion, stop_tokens=STOP)  # row 4 is negative
    assert everything.share == pytest.approx(4.5 / 10.5) and everything.n_positive == 5
    with pytest.raises(ValueError, match="no positive"):
        zero_overlap_share([-1.0, -2.0], [[1], [2]], completion)
    with pytest.raises(ValueError, match="2 influences but 3"):
        zero_overlap_share([1.0, 2.0], [[1], [2], [3]], completion)
