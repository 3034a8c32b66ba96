"""The cross-lingual statistic on hand-made 3 x k tables with known answers."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis.crosslingual import (english_scale, paired_differences, pooled_translated_minus_english,
                                   relative_grid, size_trend, translated_minus_english)


def grid(en, ko, tr) -> pd.DataFrame:
    return pd.DataFrame([en, ko, tr], index=["en", "ko", "tr"], columns=range(1, len(en) + 1), dtype=float)


# English mean 2; Korean carries no influence; Turkish equals English where translated (column 3 untranslated)
TABLE = grid([4, 2, 2, 0], [0, 0, 0, 0], [4, 2, np.nan, 0])


def test_relative_grid_divides_by_the_mean_english_influence():
    assert english_scale(TABLE) == 2.0
    relative = relative_grid(TABLE)
    assert relative.loc["en"].tolist() == [2.0, 1.0, 1.0, 0.0]
    assert math.isnan(relative.loc["tr", 3])


def test_no_influence_in_translation_is_minus_one():
    d = paired_differences(TABLE, "ko")
    assert d.tolist() == [-2.0, -1.0, -1.0, 0.0]
    result = translated_minus_english(TABLE, "ko", n_resamples=500)
    assert result.estimate == -1.0 and result.n_sequences == 4
    assert result.translated == 0.0 and result.english == 1.0
    assert result.ci_low <= -1.0 <= result.ci_high and result.ci_low >= -2.0 and result.ci_high <= 0.0


def test_untranslated_columns_are_left_out_and_equal_influence_is_zero():
    result = translated_minus_english(TABLE, "tr", n_resamples=500)
    assert result.n_sequences == 3 and result.estimate == 0.0
    assert result.ci_low == result.ci_high == 0.0  # constant differences: a point interval
    assert result.english == pytest.approx(1.0)  # columns 1, 2, 4: (2 + 1 + 0) / 3


def test_a_negative_english_mean_gives_no_scale_instead_of_a_ratio():
    negative = grid([1, -3], [0.5, 0.5], [0, 0])
    assert math.isnan(english_scale(negative))
    result = translated_minus_english(negative, "ko")
    assert math.isnan(result.estimate) and result.n_sequences == 2


def test_one_translated_column_has_no_interval():
    single = grid([2, 2], [1, np.nan], [np.nan, np.nan])
    result = translated_minus_english(single, "ko")
    assert result.estimate == -0.5 and result.n_sequences == 1 and math.isnan(result.ci_low)
    assert translated_minus_english(single, "tr").n_sequences == 0


def test_pooled_difference_over_queries():
    grids = {"a": TABLE, "b": grid([1, 1], [1, 1], [np.nan, np.nan])}
    pooled = pooled_translated_minus_english(grids, "ko", n_resamples=300)
    assert pooled.n_sequences == 6 and pooled.n_queries == 2
    assert pooled.estimate == pytest.approx((-2 - 1 - 1 + 0 + 0 + 0) / 6)
    assert pooled.ci_low <= pooled.estimate <= pooled.ci_high
    assert math.isnan(pooled_translated_minus_english({"b": grids["b"]}, "tr").estimate)


def test_rows_must_start_with_english():
    with pytest.raises(ValueError, match="English row 'en' first"):
        english_scale(TABLE.loc[["ko", "en", "tr"]])


def test_size_trend_increasing_over_three_sizes_and_two_queries():
    table = pd.DataFrame({"query": ["a"] * 3 + ["b"] * 3, "size": [10, 100, 1000] * 2,
                          "value": [-1.0, -0.5, 0.0, -0.9, -0.8, -0.1]})
    trend = size_trend(table, n_resamples=200)
    assert trend.estimate == 1.0 and trend.n_models == 3 and trend.n_queries == 2
    assert trend.p_value == pytest.approx(1 / 36)  # exact: 3! x 3! within-query permutations, one as extreme
    assert trend.ci_low == trend.ci_high == 1.0


def test_size_trend_needs_two_sizes_and_drops_incomplete_queries():
    one_size = pd.DataFrame({"query": ["a", "b"], "size": [10, 10], "value": [0.1, 0.2]})
    assert math.isnan(size_trend(one_size).estimate)
    table = pd.DataFrame({"query": ["a", "a", "b", "b"], "size": [10, 100, 10, 100], "value": [0.0, 1.0, 0.5, np.nan]})
    trend = size_trend(table)
    assert trend.n_queries == 1 and trend.estimate == 1.0 and math.isnan(trend.ci_low)
