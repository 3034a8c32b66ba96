"""Trend tests across model sizes: Page's L by hand, exact permutation nulls, mixed slopes, verdict rule."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.bootstrap import bootstrap_ci
from analysis.trends import (mixed_slope, page_trend, permutation_trend, seed_correlations, verdict_row,
                             wide_by_size)

SIZES = [1e8, 4e8, 1e9, 4e9]


def long_table(values_by_seed, sizes=SIZES):
    return pd.DataFrame([{"seed": s, "size": n, "value": v} for s, row in enumerate(values_by_seed)
                         for n, v in zip(sizes, row)])


def test_page_l_on_a_hand_made_table():
    rows = [[1, 2, 3, 4], [2, 1, 4, 3], [1, 3, 2, 4]]  # rank sums 4, 6, 9, 11: L = 4 + 12 + 27 + 44 = 87
    result = page_trend(long_table(rows).sample(frac=1, random_state=0))  # row order must not matter
    assert result.statistic == 87 and (result.n_blocks, result.n_sizes) == (3, 4)
    # exact null by brute force: each block's ranks are an independent uniform permutation of 1..4
    per_block = [sum(j * r for j, r in enumerate(p, 1)) for p in itertools.permutations(range(1, 5))]
    null = [a + b + c for a, b, c in itertools.product(per_block, repeat=3)]
    assert result.p_value == pytest.approx(np.mean(np.array(null) >= 87))
    wide = pd.DataFrame(rows, columns=SIZES)
    assert page_trend(wide[SIZES[::-1]], block_column=None).statistic == 87  # wide input, columns sorted inside
    assert page_trend(wide, "decreasing", block_column=None).statistic == 5 * 30 - 87  # predicted ranks 4..1


def test_page_refuses_gaps_and_duplicates():
    table = long_table([[1, 2, 3, 4], [2, 1, 4, 3]])
    with pytest.raises(ValueError, match="block 1 lacks a value"):
        wide_by_size(table.drop(index=5))
    with pytest.raises(ValueError, match="several values"):
        wide_by_size(pd.concat([table, table.iloc[:1]]))


def test_monotone_data_gives_the_smallest_exact_p():
    table = long_table([[0.1, 0.2, 0.5, 0.9], [1.0, 1.1, 1.2, 1.3], [-3.0, -2.0, -1.5, -1.0]])
    result = permutation_trend(table)
    assert result.exact and result.n_permutations == 24 ** 3
    assert result.estimate == 1.0
    assert result.p_value == pytest.approx(2 / 24 ** 3)  # only all-increasing and all-decreasing are as extreme
    assert permutation_trend(table, alternative="greater").p_value == pytest.approx(1 / 24 ** 3)
    assert permutation_trend(table, alternative="less").p_value == 1.0
    assert page_trend(table).p_value == pytest.approx(1 / 24 ** 3)


def test_noise_gives_a_large_p_and_monte_carlo_agrees_with_exact():
    rng = np.random.default_rng(0)
    table = long_table(rng.normal(size=(3, 4)))
    exact = permutation_trend(table)
    assert exact.p_value > 0.1
    sampled = permutation_trend(table, max_exact=0, n_permutations=20000)
    assert not sampled.exact and sampled.p_value == pytest.approx(exact.p_value, abs=0.02)


def test_rank_correlations_match_scipy_with_ties():
    table = pd.DataFrame({"seed": 0, "size": [1, 2, 3, 4, 5], "value": [1.0, 3.0, 2.0, 3.0, 5.0]})
    spearman = seed_correlations(table, "spearman").iloc[0]
    kendall = seed_correlations(table, "kendall").iloc[0]
    assert spearman == pytest.approx(stats.spearmanr(table["size"], table["value"]).statistic)
    assert kendall == pytest.approx(stats.kendalltau(table["size"], table["value"]).statistic)
    flat = pd.DataFrame({"seed": 0, "size": [1, 2, 3], "value": 2.0})
    assert seed_correlations(flat).iloc[0] == 0.0


def test_mixed_slope_recovers_a_known_slope():
    pytest.importorskip("statsmodels")
    rng = np.random.default_rng(2)
    sizes = [1e8, 4e8, 1e9, 4e9, 1e10]
    table = pd.DataFrame([{"seed": s, "size": n, "value": 2 + 0.5 * np.log(n) + 3 * s + rng.normal(0, 0.1)}
                          for s in range(4) for n in sizes])
    fit = mixed_slope(table)
    assert fit.ci_low < 0.5 < fit.ci_high and abs(fit.slope - 0.5) < 0.05 and fit.p_value < 1e-6
    assert (fit.n_models, fit.n_seeds) == (5, 4) and fit.seed_variance > 1
    per_decade = mixed_slope(table, log_base=10)
    assert per_decade.slope == pytest.approx(fit.slope * np.log(10), rel=1e-4)
    noise = mixed_slope(table.assign(value=np.random.default_rng(3).normal(size=len(table))))
    assert noise.p_value > 0.05
    with pytest.raises(ValueError, match="at least 2 seeds"):
        mixed_slope(table[table.seed == 0])


def test_monotone_trend_holds_end_to_end():
    table = long_table([[0.1, 0.2, 0.5, 0.9], [1.0, 1.1, 1.2, 1.3], [-3.0, -2.0, -1.5, -1.0]])
    test = permutation_trend(table)
    interval = bootstrap_ci(seed_correlations(table).to_numpy(), n_resamples=200)
    row = verdict_row("value rises with size", "spearman_vs_log_size", test.estimate, interval.low, interval.high,
                      test.p_value, test.n_models, test.n_seeds, threshold=0.0, direction="increasing")
    assert row["verdict"] == "holds"
    assert list(row) == ["claim", "statistic", "estimate", "ci_low", "ci_high", "p_value", "n_models", "n_seeds",
                         "verdict", "threshold", "minimum_detectable_effect"]


@pytest.mark.parametrize("estimate, low, high, p, n_models, n_seeds, threshold, direction, verdict", [
    (0.8, 0.5, 1.0, 0.001, 4, 3, 0.3, "increasing", "holds"),
    (0.8, 0.5, 1.0, 0.001, 2, 3, 0.3, "increasing", "underpowered"),     # 2 models
    (0.8, 0.5, 1.0, 0.2, 4, 3, 0.3, "increasing", "inconclusive"),       # CI and p disagree
    (-0.4, -0.7, -0.1, 0.01, 4, 3, 0.0, "increasing", "does not hold"),  # opposite direction
    (0.1, 0.05, 0.2, 0.01, 4, 3, 0.3, "increasing", "does not hold"),    # real but smaller than claimed
    (0.2, -0.3, 0.7, 0.4, 5, 3, 0.3, "increasing", "underpowered"),      # CI holds both 0 and 0.3
    (0.2, 0.1, 0.6, 0.01, 5, 3, 0.3, "increasing", "inconclusive"),      # beyond 0, short of 0.3, 0.3 in CI
    (-0.5, -0.9, -0.2, 0.01, 5, 3, -0.1, "decreasing", "holds"),
    (-0.05, -0.08, -0.02, 0.01, 5, 3, -0.1, "decreasing", "does not hold"),
    (0.5, np.nan, np.nan, None, 5, 3, 0.0, "increasing", "underpowered"),
])
def test_verdict_rule(estimate, low, high, p, n_models, n_seeds, threshold, direction, verdict):
    row = verdict_row("c", "s", estimate, low, high, p, n_models, n_seeds, threshold, direction)
    assert row["verdict"] == verdict
    assert ("minimum_detectable_effect" in row) == bool(np.isfinite(low))


def test_minimum_detectable_effect_and_refusals():
    row = verdict_row("c", "s", 0.0, -1.959963984540054, 1.959963984540054, 0.5, 5, 3, 0.0, "increasing")
    assert row["minimum_detectable_effect"] == pytest.approx(1.959964 + 0.841621, abs=1e-5)  # SE = 1
    assert row["verdict"] == "underpowered"
    with pytest.raises(ValueError, match="wrong side"):
        verdict_row("c", "s", 0.0, -1, 1, 0.5, 5, 3, -0.5, "increasing")
    with pytest.raises(ValueError, match="direction"):
        verdict_row("c", "s", 0.0, -1, 1, 0.5, 5, 3, 0.0, "up")


def test_threshold_verdict_by_where_the_ci_lies():
    from analysis.trends import threshold_verdict

    def verdict(low, high, threshold=0.5, direction="greater", **kw):
        return threshold_verdict("c", "s", (low + high) / 2, low, high, 2, 1, threshold, direction, **kw)["verdict"]

    assert verdict(0.6, 0.9) == "holds"
    assert verdict(0.1, 0.4) == "does not hold"
    assert verdict(0.3, 0.7) == "inconclusive"
    assert verdict(0.1, 0.4, direction="less") == "holds"
    assert verdict(2.5, 3.5, threshold=(2.0, 4.5), direction="inside") == "holds"
    assert verdict(5.0, 6.0, threshold=(2.0, 4.5), direction="inside") == "does not hold"
    assert verdict(4.0, 5.0, threshold=(2.0, 4.5), direction="inside") == "inconclusive"
    assert verdict(0.6, 0.9, min_models=3) == "underpowered"
    assert verdict(float("nan"), 0.9) == "underpowered"
