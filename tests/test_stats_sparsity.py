"""The sparsity study's own statistics on hand-made tables with known answers."""

from __future__ import annotations

import pandas as pd
from omegaconf import OmegaConf

from experiments.queries import Query
from experiments.sparsity import plausible_power_law, unique_queries, verdict_rows

CFG = OmegaConf.create({"thresholds": {"ks_p_value": 0.1, "plausible_share": 0.5, "alpha_range": [2.0, 4.5],
                                       "top1_share_max": 0.6, "top_smallest_share_max": 0.5},
                        "top_fractions": [0.001, 0.01, 0.1], "ci_resamples": 500})


def fits(ks, r_exp, alpha, r_lognormal=None, seed: int = 0) -> pd.DataFrame:
    n = len(ks)
    return pd.DataFrame({"model": [f"m_s{seed}"] * n, "seed": seed, "parameters": 1000,
                         "query": [f"q{i}" for i in range(n)], "candidates": ["unfiltered"] * n,
                         "ks_p_value": ks, "R_vs_exponential": r_exp, "alpha": alpha,
                         "R_vs_lognormal": r_lognormal if r_lognormal is not None else [-1.0] * n})


def shares(top1, smallest, seed: int = 0) -> pd.DataFrame:
    rows = [{"query": f"q{i}", "top_fraction": 0.01, "share": v} for i, v in enumerate(top1)]
    rows += [{"query": f"q{i}", "top_fraction": 0.001, "share": v} for i, v in enumerate(smallest)]
    return pd.DataFrame(rows).assign(model=f"m_s{seed}", seed=seed, parameters=1000)


def test_plausible_needs_both_the_ks_p_value_and_the_likelihood_ratio():
    table = fits([0.5, 0.5, 0.05, 0.9], [1.0, -1.0, 1.0, 0.2], [2.5] * 4)
    assert plausible_power_law(table).tolist() == [True, False, False, True]


def test_every_fit_plausible_holds_and_none_does_not():
    good = verdict_rows(fits([0.9] * 20, [1.0] * 20, [2.5] * 20), shares([0.2] * 20, [0.05] * 20), CFG)
    by_claim = {row["claim"]: row for row in good}
    row = by_claim["the tail of influences follows a power law"]
    assert row["estimate"] == 1.0 and row["ci_low"] == row["ci_high"] == 1.0 and row["verdict"] == "holds"
    assert by_claim["power-law exponents lie between about 2 and 4.3"]["verdict"] == "holds"
    assert all(r["verdict"] == "holds" for r in good if "handful" in r["claim"] or "spread" in r["claim"])
    assert by_claim["a power law describes the tail better than a lognormal (ours: the paper compares other tails)"][
        "verdict"] == "does not hold"  # R vs lognormal < 0 in every fit

    bad = verdict_rows(fits([0.01] * 20, [1.0] * 20, [6.0] * 20), shares([0.9] * 20, [0.8] * 20), CFG)
    assert [r["verdict"] for r in bad] == ["does not hold"] * 5


def test_half_plausible_is_inconclusive():
    rows = verdict_rows(fits([0.9, 0.01] * 10, [1.0] * 20, [2.5] * 20), shares([0.2] * 20, [0.05] * 20), CFG)
    row = rows[0]
    assert row["estimate"] == 0.5 and row["ci_low"] < 0.5 < row["ci_high"] and row["verdict"] == "inconclusive"


def test_duplicate_queries_are_fitted_once():
    queries = [Query("a", "p", " c"), Query("b", "p", " c"), Query("c", "p", " d")]
    kept, duplicates = unique_queries(queries)
    assert [q.name for q in kept] == ["a", "c"] and duplicates == [{"query": "b", "same text as": "a"}]


def test_seeds_of_one_size_are_resampled_first():
    """Seed 0: every fit plausible; seed 1: none. Pooled share 0.5; with seeds drawn first, a replicate of only
    seed 0 (or only seed 1) is possible: the CI reaches ~1 and ~0, far wider than a bootstrap over the 40 fits."""
    both = pd.concat([fits([0.9] * 20, [1.0] * 20, [2.5] * 20), fits([0.01] * 20, [1.0] * 20, [2.5] * 20, seed=1)])
    both_shares = pd.concat([shares([0.2] * 20, [0.05] * 20), shares([0.2] * 20, [0.05] * 20, seed=1)])
    row = verdict_rows(both, both_shares, CFG)[0]
    assert row["estimate"] == 0.5 and row["n_seeds"] == 2 and row["n_models"] == 1
    assert row["ci_low"] < 0.1 and row["ci_high"] > 0.9 and row["verdict"] == "inconclusive"
