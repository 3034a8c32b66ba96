"""Table 1 tail fits: known Pareto exponents are recovered; exponential and lognormal samples are told apart."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.tails import ALTERNATIVES, fit_tail, scan_x_min


def test_pareto_exponent_recovered_and_power_law_beats_exponential():
    rng = np.random.default_rng(0)
    sample = rng.pareto(1.5, 1000) + 1  # density exponent alpha = 2.5 above x_min = 1
    fit = fit_tail(np.concatenate([sample, -sample[:100]]), bootstrap_samples=30)  # negatives are ignored
    assert fit.n_positive == 1000
    assert fit.alpha == pytest.approx(2.5, abs=3 * fit.alpha_standard_error)
    assert abs(fit.alpha - 2.5) < 0.2
    assert fit.ks_p_value > 0.1
    row = fit.as_row()
    assert list(row)[:4] == ["alpha", "x_min", "tail_size", "ks_p_value"]
    assert list(row)[4:] == [f"{k}_vs_{a}" for a in ALTERNATIVES for k in ("R", "p")]
    assert row["R_vs_exponential"] > 0 and row["p_vs_exponential"] < 0.05


def test_exponential_sample_favours_the_exponential():
    rng = np.random.default_rng(1)
    fit = fit_tail(rng.exponential(1.0, 1000), tail_fraction=0.5, bootstrap_samples=30, alternatives=("exponential",))
    assert fit.tail_size == 500 and fit.x_min_method == "tail_fraction"
    assert fit.as_row()["R_vs_exponential"] < 0 and fit.as_row()["p_vs_exponential"] < 0.05
    assert fit.ks_p_value < 0.05


def test_lognormal_sample_favours_the_lognormal():
    rng = np.random.default_rng(2)
    fit = fit_tail(rng.lognormal(0.0, 1.0, 1000), tail_fraction=0.5, bootstrap_samples=0, alternatives=("lognormal",))
    assert fit.as_row()["R_vs_lognormal"] < 0 and fit.as_row()["p_vs_lognormal"] < 0.05
    assert np.isnan(fit.ks_p_value)


def test_ks_scan_finds_where_the_power_law_starts():
    rng = np.random.default_rng(3)
    body = rng.uniform(0.0, 0.5, 1000)  # nothing between 0.5 and 1: the tail starts at 1
    x = np.sort(np.concatenate([body, rng.pareto(1.5, 1000) + 1]))
    x_min, alpha, distance = scan_x_min(x, min_tail=20)
    assert 0.99 <= x_min < 1.5  # above the body; any x_min >= 1 fits a pure Pareto, so KS may pick a bit above 1
    assert abs(alpha - 2.5) < 0.2 and distance < 0.05


def test_max_tail_limits_the_scan_for_large_inputs():
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.uniform(0.0, 0.5, 20000), rng.pareto(1.5, 2000) + 1])
    fit = fit_tail(x, max_tail=400, bootstrap_samples=20, alternatives=())
    assert fit.tail_size <= 400 and fit.x_min > 1.0
    assert fit.alpha == pytest.approx(2.5, abs=3 * fit.alpha_standard_error)
    assert fit.ks_p_value > 0.1
    full = fit_tail(x[-3000:], bootstrap_samples=5, alternatives=(), seed=1)
    assert fit_tail(x[-3000:], bootstrap_samples=5, alternatives=(), seed=1, max_tail=3000) == full


def test_fixed_x_min_matches_the_closed_form():
    tail = np.array([1.0, 1.5, 2.0, 4.0, 9.0])
    fit = fit_tail(np.concatenate([tail, [0.5, -2.0, 0.0]]), x_min=1.0, min_tail=5, bootstrap_samples=0,
                   alternatives=())
    assert fit.tail_size == 5 and fit.x_min == 1.0 and fit.x_min_method == "fixed"
    assert fit.alpha == pytest.approx(1 + 5 / np.log(tail).sum())
    assert fit.alpha_standard_error == pytest.approx((fit.alpha - 1) / np.sqrt(5))
    assert fit.as_row() == {"alpha": fit.alpha, "x_min": 1.0, "tail_size": 5, "ks_p_value": fit.ks_p_value}


def test_refusals():
    with pytest.raises(ValueError, match="positive influences"):
        fit_tail(np.array([1.0, -1.0, 2.0]))
    with pytest.raises(ValueError, match="not both"):
        fit_tail(np.arange(1.0, 100.0), x_min=2.0, tail_fraction=0.1)
    with pytest.raises(ValueError, match="unknown alternative"):
        fit_tail(np.arange(1.0, 100.0), bootstrap_samples=0, alternatives=("gumbel",))
