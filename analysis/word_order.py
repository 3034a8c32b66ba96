"""Statistics of the word-order probes (paper Sec 5.3.4, Figs 24-25): influence of probe sequences by group.

Input: a long score table, one row per (model, query, probe) with columns model, query, group and influence
(the probe's influence on its query); other columns are carried along where named.

- group_means: per (model, query, group) the mean influence over the group's probes, with a percentile
  bootstrap CI over probes (analysis.bootstrap.bootstrap_ci; NaN for a group with a single probe).
- mean_difference: mean(a) - mean(b) of two independent samples, with a percentile bootstrap CI that resamples
  each sample within itself (B draws of mean(a*) - mean(b*)).
- flip_contrast: per (model, query) the difference D_q = R_q - F_q of the mean influence of the rewordings (R)
  and of the order-flipped probes (F), with mean_difference's CI. A difference, not a ratio R/F of noisy means.
- sharp_reduction_verdict: the claim "flipping the word order sharply reduces influence" for one model's queries
  as the linear contrast C = mean_q (k R_q - F_q), k = the fraction of the rewordings' influence that flipped
  probes may keep at most (set in the study config before results are seen; 0.5: flipping removes more than
  half). C > 0 <=> mean_q F_q < k mean_q R_q, with no division. CI: stratified percentile bootstrap, the probes
  of every (query, group) resampled within their stratum. Decided by analysis.trends.verdict_row with
  null = threshold = 0, direction "greater" (holds: CI above 0; does not hold: CI below 0; else underpowered).
  The claim is about a positive influence being reduced: when the rewordings' pooled mean mean_q R_q has a
  stratified CI that does not lie above 0, there is no influence to reduce, and the estimate is NaN
  ("underpowered", with the reason in the row's `note`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from analysis.bootstrap import Interval, bootstrap_ci
from analysis.trends import verdict_row

REWORDINGS, FLIPPED = "rewordings", "order_flipped"


def _check(table: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"score table lacks columns {missing} (has {list(table.columns)})")
    if "influence" in columns and not np.isfinite(table["influence"].to_numpy(dtype=np.float64)).all():
        bad = table.index[~np.isfinite(table["influence"].to_numpy(dtype=np.float64))][0]
        raise ValueError(f"row {bad!r}: influence is not finite")


def group_means(scores: pd.DataFrame, keys: Sequence[str] = ("model", "query"), group_order: Sequence[str] | None = None,
                confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per (keys..., group): mean_influence, ci_low, ci_high (bootstrap over probes), n_probes.

    Rows in the order of first appearance of keys, groups in `group_order` (default: first appearance)."""
    keys = list(keys)
    _check(scores, keys + ["group", "influence"])
    rows = []
    for key, table in scores.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        present = list(dict.fromkeys(table["group"]))
        order = [g for g in group_order if g in present] if group_order is not None else present
        for group in order:
            values = table.loc[table["group"] == group, "influence"].to_numpy(dtype=np.float64)
            if len(values) >= 2:
                interval = bootstrap_ci(values, np.mean, confidence, n_resamples, seed=seed)
                low, high = interval.low, interval.high
            else:
                low = high = float("nan")
            rows.append({**dict(zip(keys, key)), "group": group, "mean_influence": float(values.mean()),
                         "ci_low": low, "ci_high": high, "n_probes": len(values)})
    return pd.DataFrame(rows, columns=keys + ["group", "mean_influence", "ci_low", "ci_high", "n_probes"])


def _mean_draws(values: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(B,) means of resamples with replacement of values (n,)."""
    return values[rng.integers(0, len(values), (n_resamples, len(values)))].mean(axis=1)


def _percentile(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return float(low), float(high)


def mean_difference(a, b, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> Interval:
    """mean(a) - mean(b) for independent samples a (n_a,), b (n_b,), each resampled within itself; percentile CI."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1 or not len(a) or not len(b):
        raise ValueError(f"need two non-empty 1-D samples, got shapes {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("samples must be finite")
    rng = np.random.default_rng(seed)
    draws = _mean_draws(a, n_resamples, rng) - _mean_draws(b, n_resamples, rng)
    low, high = _percentile(draws, confidence)
    return Interval(float(a.mean() - b.mean()), low, high, confidence, len(a) + len(b), "two-sample percentile")


def flip_contrast(scores: pd.DataFrame, keys: Sequence[str] = ("model", "query"), high: str = REWORDINGS,
                  low: str = FLIPPED, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per (keys...): rewordings_mean (R), flipped_mean (F), difference R - F with ci_low, ci_high, and the probe
    counts; keys lacking either group are left out."""
    keys = list(keys)
    _check(scores, keys + ["group", "influence"])
    rows = []
    for key, table in scores.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        a = table.loc[table["group"] == high, "influence"].to_numpy(dtype=np.float64)
        b = table.loc[table["group"] == low, "influence"].to_numpy(dtype=np.float64)
        if not len(a) or not len(b):
            continue
        interval = mean_difference(a, b, confidence, n_resamples, seed)
        rows.append({**dict(zip(keys, key)), "rewordings_mean": float(a.mean()), "flipped_mean": float(b.mean()),
                     "difference": interval.estimate, "ci_low": interval.low, "ci_high": interval.high,
                     "n_rewordings": len(a), "n_flipped": len(b)})
    return pd.DataFrame(rows, columns=keys + ["rewordings_mean", "flipped_mean", "difference", "ci_low", "ci_high",
                                              "n_rewordings", "n_flipped"])


def _query_draws(scores: pd.DataFrame, fraction: float, n_resamples: int, rng: np.random.Generator):
    """One seed's probe scores -> per query (fraction * R*_q - F*_q, R*_q) bootstrap draws (B,) and points."""
    contrast, rewording, point_c, point_m = [], [], [], []
    for _, table in scores.groupby("query", sort=False):
        a = table.loc[table["group"] == REWORDINGS, "influence"].to_numpy(dtype=np.float64)
        b = table.loc[table["group"] == FLIPPED, "influence"].to_numpy(dtype=np.float64)
        if not len(a) or not len(b):
            continue
        draws_a, draws_b = _mean_draws(a, n_resamples, rng), _mean_draws(b, n_resamples, rng)
        contrast.append(fraction * draws_a - draws_b)
        rewording.append(draws_a)
        point_c.append(fraction * a.mean() - b.mean())
        point_m.append(a.mean())
    return contrast, rewording, point_c, point_m


def sharp_reduction(scores: pd.DataFrame, fraction: float, confidence: float = 0.95, n_resamples: int = 2000,
                    seed: int = 0) -> dict:
    """For one model size's probe scores over its queries: C = mean_q (fraction * R_q - F_q) and the rewordings'
    pooled mean M = mean_q R_q, each with a stratified bootstrap CI; queries lacking either group are left out.

    With a `seed` column holding several training seeds (models of the same size), C and M are means over seeds
    of each seed's value, and the CI is two-level: every replicate draws the seeds with replacement, then uses
    each drawn seed's stratified probe resample. Without it (or with one seed) the one-level CI above.

    Returns {estimate, ci_low, ci_high, rewordings_mean, rewordings_ci_low, rewordings_ci_high, n_queries,
    n_seeds}."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must lie in [0, 1), got {fraction}")
    _check(scores, ["query", "group", "influence"])
    rng = np.random.default_rng(seed)
    by_seed = [table for _, table in scores.groupby("seed", sort=True)] if "seed" in scores.columns else [scores]
    per_seed = []  # (C draws (B,), M draws (B,), C point, M point, queries) per seed
    for table in by_seed:
        contrast, rewording, point_c, point_m = _query_draws(table, fraction, n_resamples, rng)
        if contrast:
            per_seed.append((np.mean(contrast, axis=0), np.mean(rewording, axis=0), float(np.mean(point_c)),
                             float(np.mean(point_m)), len(contrast)))
    if not per_seed:
        raise ValueError(f"no query has both {REWORDINGS!r} and {FLIPPED!r} probes")
    c_draws, m_draws = np.stack([p[0] for p in per_seed]), np.stack([p[1] for p in per_seed])  # (S, B)
    if len(per_seed) > 1:
        picks = rng.integers(0, len(per_seed), (n_resamples, len(per_seed)))  # (B, S) seeds drawn per replicate
        columns = np.arange(n_resamples)[:, None]
        c_draws, m_draws = c_draws[picks, columns].T, m_draws[picks, columns].T
    c_low, c_high = _percentile(c_draws.mean(axis=0), confidence)
    m_low, m_high = _percentile(m_draws.mean(axis=0), confidence)
    return {"estimate": float(np.mean([p[2] for p in per_seed])), "ci_low": c_low, "ci_high": c_high,
            "rewordings_mean": float(np.mean([p[3] for p in per_seed])), "rewordings_ci_low": m_low,
            "rewordings_ci_high": m_high, "n_queries": max(p[4] for p in per_seed), "n_seeds": len(per_seed)}


def sharp_reduction_verdict(scores: pd.DataFrame, fraction: float, label: str, confidence: float = 0.95,
                            n_resamples: int = 2000, seed: int = 0) -> dict:
    """The verdict row (analysis.trends.verdict_row) of "flipping the word order sharply reduces influence" for one
    model size's probe scores (its seeds in a `seed` column, if several); `label` names the models and queries in
    the statistic. See the module docstring."""
    test = sharp_reduction(scores, fraction, confidence, n_resamples, seed)
    positive = test["rewordings_ci_low"] > 0
    estimate = test["estimate"] if positive else float("nan")
    row = verdict_row(
        "flipping the word order sharply reduces influence",
        f"{label}: mean over {test['n_queries']} queries of ({fraction:g} x mean influence of rewordings - mean "
        f"influence of order-flipped probes); > 0: flipped probes keep less than {fraction:g} of it",
        estimate, test["ci_low"], test["ci_high"], None, n_models=1, n_seeds=test["n_seeds"], threshold=0.0,
        direction="greater",
        alpha=1 - confidence, min_models=1, null=0.0)
    row["note"] = (f"rewordings' mean influence {test['rewordings_mean']:.4g} ({confidence:.0%} CI {test['rewordings_ci_low']:.4g} "
                   f"to {test['rewordings_ci_high']:.4g})" + ("" if positive else
                   "; not above 0: no positive influence to reduce, so the claim cannot be assessed"))
    row["fraction"] = fraction
    row["rewordings_mean"] = test["rewordings_mean"]
    return row
