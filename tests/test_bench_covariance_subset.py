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
