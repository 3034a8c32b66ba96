"""Bootstrap intervals with known answers: points, coverage, exact seed-level distributions, refusals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.bootstrap import bootstrap_ci, cluster_bootstrap, mean_log_ratio, paired_log_ratios


@pytest.mark.parametrize("method", ["percentile", "BCa"])
def test_ci_of_a_constant_is_a_point(method):
    interval = bootstrap_ci(np.full(12, 3.0), method=method, n_resamples=200)
    assert (interval.estimate, interval.low, interval.high) == (3.0, 3.0, 3.0)


def test_coverage_of_the_mean_of_normal_samples():
    rng = np.random.default_rng(0)
    hits = 0
    for i in range(200):
        interval = bootstrap_ci(rng.normal(1.0, 2.0, 40), n_resamples=500, seed=i)
        hits += interval.low <= 1.0 <= interval.high
        assert interval.low < interval.estimate < interval.high
    assert 0.88 <= hits / 200 <= 0.99  # nominal 0.95; the percentile interval runs slightly short at n = 40


def test_paired_samples_are_resampled_together():
    x = np.arange(20.0)
    interval = bootstrap_ci((x, 2 * x + 1), lambda a, b: np.mean(b - 2 * a), n_resamples=200)
    assert (interval.low, interval.high) == (1.0, 1.0)  # b - 2a = 1 in every row, whatever rows are drawn


def test_cluster_bootstrap_exact_seed_distribution():
    # seed 0: every unit is 0, seed 1: every unit is 1. Drawing 2 seeds gives means 0, 0.5, 1 w.p. 1/4, 1/2, 1/4
    table = pd.DataFrame({"seed": [0] * 5 + [1] * 5, "unit": list(range(5)) * 2, "value": [0.0] * 5 + [1.0] * 5})
    both = cluster_bootstrap(table, n_resamples=2000)
    assert both.estimate == 0.5 and (both.low, both.high) == (0.0, 1.0) and both.n == 2
    units_only = cluster_bootstrap(table, resample=("unit",), n_resamples=200)
    assert (units_only.low, units_only.high) == (0.5, 0.5)  # seeds held fixed, units within a seed identical


def test_cluster_bootstrap_is_wider_than_ignoring_seeds():
    rng = np.random.default_rng(1)
    offsets = rng.normal(0, 1.0, 6)  # large seed effects, small unit noise
    table = pd.DataFrame([{"seed": s, "unit": u, "value": offsets[s] + rng.normal(0, 0.05)}
                          for s in range(6) for u in range(30)])
    clustered = cluster_bootstrap(table, n_resamples=500)
    naive = bootstrap_ci(table["value"].to_numpy(), n_resamples=500)
    assert clustered.estimate == pytest.approx(naive.estimate)
    assert clustered.high - clustered.low > 3 * (naive.high - naive.low)


def test_rows_of_one_unit_travel_together():
    # two rows per unit with values u and -u: any unit-level resample has mean exactly 0
    table = pd.DataFrame({"seed": 0, "unit": [0, 0, 1, 1, 2, 2], "value": [1.0, -1.0, 2.0, -2.0, 5.0, -5.0]})
    interval = cluster_bootstrap(table, n_resamples=200)
    assert (interval.low, interval.high) == (0.0, 0.0)


def test_mean_log_ratio_against_the_formula():
    a = pd.Series([2.0, 8.0, 1.0, 4.0], index=["q1", "q2", "q3", "q4"])
    b = np.array([1.0, 2.0, 1.0, 1.0])
    assert paired_log_ratios(a, b) == pytest.approx(np.log([2.0, 4.0, 1.0, 4.0]))
    summary = mean_log_ratio(a, b, n_resamples=500)
    assert summary.mean_log_ratio == pytest.approx(np.log(32.0) / 4)
    assert summary.ratio == pytest.approx(32.0 ** 0.25)  # geometric mean, not mean(a) / mean(b) = 3
    assert summary.ci_low <= summary.mean_log_ratio <= summary.ci_high
    assert summary.ratio_low == pytest.approx(np.exp(summary.ci_low)) and summary.n == 4


def test_log_ratio_refuses_non_positive_denominators_naming_the_row():
    a = pd.Series([1.0, 2.0, 3.0], index=["water", "shutdown", "bullet"])
    with pytest.raises(ValueError, match="row 'shutdown': denominator -0.5 <= 0"):
        mean_log_ratio(a, [1.0, -0.5, 2.0])
    with pytest.raises(ValueError, match="row 2: denominator 0.0"):
        paired_log_ratios([1.0, 2.0, 3.0], [1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="row 'b': numerator"):
        paired_log_ratios([1.0, -2.0], [1.0, 1.0], labels=["a", "b"])
