"""Word-order probe statistics on hand-made score tables with known answers (analysis/word_order.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.word_order import (flip_contrast, group_means, mean_difference, sharp_reduction,
                                 sharp_reduction_verdict)


def table(groups: dict[tuple[str, str], list[float]], model: str = "m") -> pd.DataFrame:
    """{(query, group): influences} -> the long score table."""
    return pd.DataFrame([{"model": model, "query": q, "group": g, "influence": v}
                         for (q, g), values in groups.items() for v in values])


# query a: rewordings 10 (constant), flipped 1; query b: rewordings 4 and 6, flipped 0 and 2
KNOWN = table({("a", "rewordings"): [10.0, 10.0, 10.0], ("a", "order_flipped"): [1.0, 1.0],
               ("a", "irrelevant"): [0.0], ("b", "rewordings"): [4.0, 6.0], ("b", "order_flipped"): [0.0, 2.0]})


def test_group_means_per_model_query_and_group():
    means = group_means(KNOWN, group_order=["rewordings", "order_flipped", "irrelevant"], n_resamples=200)
    assert list(zip(means["query"], means["group"])) == [("a", "rewordings"), ("a", "order_flipped"),
                                                         ("a", "irrelevant"), ("b", "rewordings"),
                                                         ("b", "order_flipped")]
    assert means["mean_influence"].tolist() == [10.0, 1.0, 0.0, 5.0, 1.0]
    assert means["n_probes"].tolist() == [3, 2, 1, 2, 2]
    constant = means.iloc[0]
    assert constant["ci_low"] == constant["ci_high"] == 10.0  # a constant group: a point interval
    assert np.isnan(means.iloc[2]["ci_low"])  # one probe: no interval
    b = means.iloc[3]
    assert 4.0 <= b["ci_low"] <= 5.0 <= b["ci_high"] <= 6.0  # resampling {4, 6}: means 4, 5 or 6


def test_mean_difference_of_independent_samples():
    interval = mean_difference([1.0, 2.0, 3.0], [0.0, 0.0], n_resamples=500)
    assert interval.estimate == 2.0
    assert 1.0 <= interval.low <= 2.0 <= interval.high <= 3.0  # b is constant: the interval of mean(a*)
    rng = np.random.default_rng(1)
    a, b = rng.normal(3.0, 1.0, 400), rng.normal(1.0, 2.0, 300)
    interval = mean_difference(a, b, n_resamples=4000)
    se = np.sqrt(a.var() / 400 + b.var() / 300)
    assert abs((interval.high - interval.low) - 2 * 1.96 * se) < 0.15 * 2 * 1.96 * se  # the normal theory width
    with pytest.raises(ValueError, match="non-empty"):
        mean_difference([], [1.0])


def test_flip_contrast_is_a_difference_per_query():
    contrast = flip_contrast(KNOWN, n_resamples=500)
    assert contrast["query"].tolist() == ["a", "b"]
    assert contrast["difference"].tolist() == [9.0, 4.0]
    assert contrast[["rewordings_mean", "flipped_mean"]].values.tolist() == [[10.0, 1.0], [5.0, 1.0]]
    a, b = contrast.iloc[0], contrast.iloc[1]
    assert a["ci_low"] == a["ci_high"] == 9.0  # both groups of query a are constant
    assert 2.0 <= b["ci_low"] <= 4.0 <= b["ci_high"] <= 6.0  # (4..6) - (0..2)
    # a query without flipped probes has no contrast
    assert flip_contrast(KNOWN[KNOWN["group"] != "order_flipped"]).empty


def test_sharp_reduction_contrast_and_verdicts():
    # C = mean_q (0.5 R_q - F_q) = ((5 - 1) + (2.5 - 1)) / 2 = 2.75
    test = sharp_reduction(KNOWN, 0.5, n_resamples=1000)
    assert test["estimate"] == pytest.approx(2.75) and test["rewordings_mean"] == pytest.approx(7.5)
    assert test["n_queries"] == 2 and test["ci_low"] <= 2.75 <= test["ci_high"]
    row = sharp_reduction_verdict(KNOWN, 0.5, "m, forward queries", n_resamples=1000)
    assert row["verdict"] == "holds" and row["ci_low"] > 0 and row["threshold"] == 0.0
    assert row["claim"] == "flipping the word order sharply reduces influence"
    # flipped probes as influential as the rewordings: C = -0.5 R < 0 with a CI below zero
    same = table({("a", "rewordings"): [10.0, 10.0], ("a", "order_flipped"): [10.0, 10.0]})
    assert sharp_reduction_verdict(same, 0.5, "m")["verdict"] == "does not hold"
    # noise that straddles zero: underpowered
    noisy = table({("a", "rewordings"): [10.0, 2.0], ("a", "order_flipped"): [-2.0, 7.0]})
    assert sharp_reduction_verdict(noisy, 0.5, "m", n_resamples=1000)["verdict"] == "underpowered"


def test_no_positive_rewording_influence_cannot_be_reduced():
    """Rewordings at -1, flipped at -5: C = -0.5 + 5 > 0, but there was no positive influence to reduce."""
    negative = table({("a", "rewordings"): [-1.0, -1.0], ("a", "order_flipped"): [-5.0, -5.0]})
    row = sharp_reduction_verdict(negative, 0.5, "m")
    assert row["verdict"] == "underpowered" and np.isnan(row["estimate"])
    assert "no positive influence to reduce" in row["note"]
    with pytest.raises(ValueError, match="fraction"):
        sharp_reduction(KNOWN, 1.5)


def test_sharp_reduction_over_seeds_is_the_mean_of_the_seeds_with_a_two_level_ci():
    """Seed 0 is KNOWN (C = 2.75); seed 1 has constant probes with C = 0.5 * 8 - 2 = 2: the estimate is their mean
    2.375, and the two-level CI spans both seeds' values (seeds drawn with replacement)."""
    seed1 = table({("a", "rewordings"): [8.0, 8.0], ("a", "order_flipped"): [2.0, 2.0]})
    both = pd.concat([KNOWN.assign(seed=0), seed1.assign(seed=1)], ignore_index=True)
    test = sharp_reduction(both, 0.5, n_resamples=2000)
    assert test["estimate"] == pytest.approx((2.75 + 2.0) / 2) and test["n_seeds"] == 2
    assert test["rewordings_mean"] == pytest.approx((7.5 + 8.0) / 2)
    assert test["ci_low"] <= 2.0 + 1e-9 and test["ci_high"] >= 2.75 - 1e-9  # all-seed-1 and all-seed-0 replicates
    assert sharp_reduction_verdict(both, 0.5, "size m")["n_seeds"] == 2
    one = sharp_reduction(KNOWN.assign(seed=0), 0.5, n_resamples=1000)  # one seed: the one-level CI, unchanged
    assert one == {**sharp_reduction(KNOWN, 0.5, n_resamples=1000), "n_seeds": 1}
