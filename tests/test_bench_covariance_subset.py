"""The covariance-subset benchmark's accuracy statistics on a hand-made score table with known answers."""

import pytest
import torch

from benchmarks.covariance_subset import accuracy


def test_accuracy_separates_pooled_and_per_query_pearson():
    """Query 0 agrees exactly; query 1 (scale 100) has its 100 scores shuffled against the reference. Per query:
    Pearson 1 and the shuffled pair's r; the pooled Pearson is dominated by query 1's scale."""
    values = torch.arange(100, dtype=torch.float64)
    shuffled = values[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    reference = torch.stack([values, 100 * values])
    scores = torch.stack([values, 100 * shuffled])
    r1 = float(torch.corrcoef(torch.stack([values, shuffled]))[0, 1])
    out = accuracy(reference, scores)
    assert out["pearson_mean_query"] == pytest.approx((1 + r1) / 2)
    assert out["pearson_min_query"] == pytest.approx(r1)
    pooled = float(torch.corrcoef(torch.stack([reference.flatten(), scores.flatten()]))[0, 1])
    assert out["pearson"] == pytest.approx(pooled, abs=1e-6)
    assert out["top100_overlap"] == pytest.approx(1.0)  # 100 sequences: each top 100 is all of them


def test_choice_takes_the_cheapest_fit_whose_per_query_pearson_reaches_the_target():
    """Fraction 0.1 is cheapest but its per-query mean is 0.95 (its pooled 0.999 would have passed); one pass (1.25 x)
    and fraction 0.5 (1.6 x) reach 0.99: one pass is chosen and meets 1.3 x."""
    import pandas as pd

    from benchmarks.covariance_subset import choice

    def row(fit, fraction, seed, ratio, mean, pooled, cache=0):
        return dict(workload="w", fit=fit, covariance_fraction=fraction, correction_fraction=1.0, seed=seed,
                    fit_over_floor=ratio,
                    pearson_mean_query=mean, pearson_min_query=mean - 0.1, pearson=pooled, top100_overlap=0.9,
                    token_cache_bytes=cache)

    table = pd.DataFrame([row("two_pass", 1.0, 0, 2.2, 1.0, 1.0), row("two_pass", 0.1, 0, 1.1, 0.95, 0.999),
                          row("two_pass", 0.5, 0, 1.6, 0.995, 0.999), row("one_pass", 1.0, 0, 1.25, 0.992, 0.998, 2**21),
                          row("two_pass", 1.0, 1, 2.1, 0.993, 0.999)])
    text = choice(table)
    assert "- w: cheapest fit at a per-query Pearson >= 0.99: one pass, Pearson per query 0.9920" in text
    assert "fit 1.25 x floor (meets <= 1.3)" in text and "its kept tokens 2 MiB" in text
    assert "(seed 1): Pearson per query 0.9930" in text
    worse = table.assign(pearson_mean_query=[1.0, 0.95, 0.98, 0.97, 0.99])
    assert "- w: no fit below the full one reaches a per-query Pearson of 0.99." in choice(worse)
