"""The power-law tail fit recovers known exponents and tells a power law from an exponential."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.power_law import ks_distance, power_law_mle, top_share
from analysis.tails import fit_tail


def test_exponent_of_a_pareto_sample_is_recovered():
    rng = np.random.default_rng(0)
    sample = rng.pareto(2.0, 20000) + 1  # density exponent alpha = 3
    fit = fit_tail(sample, tail_fraction=0.2, bootstrap_samples=100)
    assert fit.alpha == pytest.approx(3.0, abs=3 * fit.alpha_standard_error)
    assert fit.ks_p_value > 0.1
    assert fit.likelihood_ratios["exponential"][0] > 0


def test_an_exponential_tail_is_rejected():
    rng = np.random.default_rng(1)
    fit = fit_tail(rng.exponential(1.0, 20000), tail_fraction=0.1, bootstrap_samples=100)
    assert fit.ks_p_value < 0.05
    assert fit.likelihood_ratios["exponential"][0] < 0


def test_mle_and_ks_against_direct_formulas():
    tail = np.array([1.0, 1.5, 2.0, 4.0, 9.0])
    alpha, _ = power_law_mle(tail, 1.0)
    assert alpha == pytest.approx(1 + 5 / np.log(tail).sum())
    cdf = 1 - tail ** (1 - alpha)
    brute = max(max(abs((i + 1) / 5 - c), abs(i / 5 - c)) for i, c in enumerate(cdf))
    assert ks_distance(tail, 1.0, alpha) == pytest.approx(brute)


def test_top_share_by_brute_force():
    values = np.array([10.0, -3.0, 5.0, 1.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0])
    shares = top_share(values, (0.1, 0.2, 1.0))
    assert shares == {0.1: pytest.approx(0.5), 0.2: pytest.approx(0.75), 1.0: pytest.approx(1.0)}


def test_too_few_positive_values_is_an_error():
    with pytest.raises(ValueError, match="positive influences"):
        fit_tail(np.array([1.0, -1.0, 2.0]))
