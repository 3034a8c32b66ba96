"""Statistics against real retraining: the linear datamodeling score (LDS), its noise ceiling, and calibration.

LDS (Park et al. 2023): for M random subsets S_m of the training set, the predicted change of query q is the sum of
its scores over the subset, g_m(q) = sum_{z in S_m} tau(q, z), and the measured one is f_q(theta_{S_m}) (log
p(completion) after fine-tuning on S_m, mean over seeds). LDS(q) = Spearman over m of (g_m(q), measured); the LDS
is its mean over queries. Noise ceiling: the same Spearman between two seeds' measurements of the same subsets
(how well one retraining predicts another); `noise_ceiling_mean` = 2r / (1 + r) (Spearman-Brown), the ceiling for
the two-seed mean the LDS is computed against. CIs: percentile bootstrap that resamples subsets and queries jointly.

Calibration: k added copies of z are epsilon = k / N; the predicted change of f_q is epsilon x tau(q, z) (tau per
unit epsilon); slope and Pearson of measured against predicted over the (query, sequence) pairs.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy.stats import rankdata


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks along the first axis: (M, ...) -> (M, ...)."""
    return rankdata(x, axis=0)


def _columnwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson of each column pair: a, b (M, Q) -> (Q,); NaN where a column is constant."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(axis=0) / np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))


def spearman_per_query(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Spearman over subsets for each query: predicted, measured (M, Q) -> (Q,)."""
    return _columnwise_pearson(_ranks(predicted), _ranks(measured))


def predicted_sums(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """g_m(q) = sum_{z in S_m} tau(q, z): scores (Q, N), masks (M, N) bool -> (M, Q)."""
    return masks.astype(np.float64) @ scores.T


def bootstrap_mean_spearman(predicted: np.ndarray, measured: np.ndarray, resamples: int, seed: int,
                            confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean over queries of the per-query Spearman, CI low, CI high); subsets and queries resampled jointly."""
    estimate = float(np.nanmean(spearman_per_query(predicted, measured)))
    generator = np.random.default_rng(seed)
    num_subsets, num_queries = predicted.shape
    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample of constant columns: NaN, left out
        for _ in range(resamples):
            rows = generator.integers(num_subsets, size=num_subsets)
            cols = generator.integers(num_queries, size=num_queries)
            values.append(np.nanmean(spearman_per_query(predicted[rows][:, cols], measured[rows][:, cols])))
    low, high = np.nanquantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
    return estimate, float(low), float(high)


def lds_table(scores: dict[str, np.ndarray], masks: np.ndarray, measured: np.ndarray, resamples: int = 1000,
              seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """scores: method -> (Q, N); masks (M, N); measured (M, S, Q) for S >= 2 seeds.

    Returns (table: method, lds, ci_low, ci_high, noise_ceiling, noise_ceiling_low, noise_ceiling_high,
    noise_ceiling_mean, subsets, seeds, queries; per-query LDS: method, query, lds)."""
    if measured.ndim != 3 or measured.shape[1] < 2:
        raise ValueError(f"measured must be (subsets, seeds >= 2, queries), got shape {measured.shape}")
    target = measured.mean(axis=1)
    ceiling, ceiling_low, ceiling_high = bootstrap_mean_spearman(measured[:, 0], measured[:, 1], resamples, seed)
    rows, per_query = [], []
    for method, values in scores.items():
        predicted = predicted_sums(values, masks)
        lds, low, high = bootstrap_mean_spearman(predicted, target, resamples, seed)
        rows.append({"method": method, "lds": lds, "ci_low": low, "ci_high": high, "noise_ceiling": ceiling,
                     "noise_ceiling_low": ceiling_low, "noise_ceiling_high": ceiling_high,
                     "noise_ceiling_mean": 2 * ceiling / (1 + ceiling), "subsets": masks.shape[0],
                     "seeds": measured.shape[1], "queries": measured.shape[2]})
        for q, value in enumerate(spearman_per_query(predicted, target)):
            per_query.append({"method": method, "query": q, "lds": float(value)})
    return pd.DataFrame(rows), pd.DataFrame(per_query)


def calibration_fit(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    """Slope (least squares with intercept, and through the origin), intercept and Pearson of measured on predicted."""
    predicted, measured = np.asarray(predicted, float), np.asarray(measured, float)
    if len(predicted) < 3 or np.std(predicted) == 0:
        return {"slope": float("nan"), "slope_origin": float("nan"), "intercept": float("nan"),
                "pearson": float("nan"), "pairs": int(len(predicted))}
    slope, intercept = np.polyfit(predicted, measured, 1)
    return {"slope": float(slope), "slope_origin": float(predicted @ measured / (predicted @ predicted)),
            "intercept": float(intercept), "pearson": float(np.corrcoef(predicted, measured)[0, 1]),
            "pairs": int(len(predicted))}


def calibration_table(pairs: pd.DataFrame, methods) -> pd.DataFrame:
    """pairs: one row per (query, sequence, copies) with `measured` and `predicted_<method>` (nats); one row per
    (method, copies) and per method over every k (copies = 'all')."""
    rows = []
    for method in methods:
        for copies, group in [*pairs.groupby("copies"), ("all", pairs)]:
            rows.append({"method": method, "copies": str(copies),
                         **calibration_fit(group[f"predicted_{method}"], group["measured"])})
    return pd.DataFrame(rows)
