"""Trends of a statistic across model sizes, with seeds (or queries) as blocks, and a verdict per claim.

Tables are long: one row per (block, size) with columns block/seed, size (number of parameters, > 0) and
value. Sizes are ordered by their numeric value.

(a) page_trend: Page's L test (Page 1963) for the ordered alternative "value increases (or decreases) with
    size". Each block's values are ranked 1..k across the k sizes (average ranks for ties); with R_j the rank
    sum of size j over the m blocks, L = sum_j j * R_j (j = predicted rank). scipy.stats.page_trend_test gives
    L and its p-value (exact for small tables, else the normal approximation).
(b) permutation_trend: the mean over seeds of the within-seed rank correlation (Spearman rho or Kendall tau-b)
    between value and log(size) (rank correlations do not change under the log). Null: within each seed, the
    size labels are exchangeable; the null distribution permutes the sizes within every seed independently.
    Exact (every combination of within-seed permutations) when there are at most max_exact of them, else
    Monte Carlo with p = (1 + #{T* at least as extreme}) / (1 + B). A seed with tied values throughout has
    correlation 0.
(c) mixed_slope: value ~ b0 + b1 log(size) + u_seed + e, u_seed ~ N(0, s_u^2) (random intercept per seed),
    fitted by REML with statsmodels MixedLM; returns b1 with its Wald (normal) CI and p. With few seeds the
    Wald test is anti-conservative: in a simulation with 4 seeds x 5 sizes of pure noise it rejected at the
    nominal 5% level about 9% of the time; prefer permutation_trend for the p-value of a small design.
(d) verdict_row: one row of a claims table, the verdict by the rule in its docstring.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

INCREASING = ("increasing", "greater", "positive")
DECREASING = ("decreasing", "less", "negative")
VERDICTS = ("holds", "does not hold", "underpowered", "inconclusive")


def _name(label):
    """A label as a plain Python value for messages (np.int64(1) -> 1)."""
    return label.item() if isinstance(label, np.generic) else label


def _check_columns(table: pd.DataFrame, columns) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks columns {missing} (has {list(table.columns)})")


def _sign(direction: str) -> int:
    if direction in INCREASING:
        return 1
    if direction in DECREASING:
        return -1
    raise ValueError(f"direction must be one of {INCREASING + DECREASING}, got '{direction}'")


def wide_by_size(table: pd.DataFrame, block_column: str = "seed", size_column: str = "size",
                 value_column: str = "value") -> pd.DataFrame:
    """Long (block, size, value) -> wide blocks x sizes (columns ascending); refuses duplicates and gaps."""
    _check_columns(table, (block_column, size_column, value_column))
    duplicated = table.duplicated([block_column, size_column])
    if duplicated.any():
        row = table[duplicated].iloc[0]
        raise ValueError(f"block {_name(row[block_column])!r} has several values at size {_name(row[size_column])!r}")
    wide = table.pivot(index=block_column, columns=size_column, values=value_column)
    wide = wide[sorted(wide.columns)]
    gaps = wide.isna().any(axis=1)
    if gaps.any():
        block = wide.index[gaps][0]
        raise ValueError(f"block {_name(block)!r} lacks a value at sizes {list(wide.columns[wide.loc[block].isna()])}")
    return wide


@dataclass(frozen=True)
class PageTrend:
    statistic: float  # Page's L
    p_value: float
    n_blocks: int
    n_sizes: int
    method: str  # "exact" or "asymptotic"


def page_trend(table: pd.DataFrame, direction: str = "increasing", block_column: str | None = "seed",
               size_column: str = "size", value_column: str = "value", method: str = "auto") -> PageTrend:
    """Page's L test of an ordered trend over sizes, blocks = seeds or queries.

    table: long (block_column, size_column, value_column), or with block_column=None already wide: rows =
    blocks, columns = sizes (sorted ascending here). direction "decreasing" predicts rank k for the smallest.
    """
    wide = table[sorted(table.columns)] if block_column is None else wide_by_size(table, block_column,
                                                                                     size_column, value_column)
    if wide.isna().to_numpy().any():
        raise ValueError("the wide table has missing values")
    k = wide.shape[1]
    if wide.shape[0] < 1 or k < 3:
        raise ValueError(f"Page's test needs at least 3 sizes, got {k}")
    ranks = np.arange(1, k + 1) if _sign(direction) > 0 else np.arange(k, 0, -1)
    result = stats.page_trend_test(wide.to_numpy(dtype=np.float64), predicted_ranks=ranks, method=method)
    return PageTrend(float(result.statistic), float(result.pvalue), wide.shape[0], k, result.method)


def _rank_correlations(x_perms: np.ndarray, y: np.ndarray, method: str) -> np.ndarray:
    """Rank correlation of y (n,) with each row of x_perms (P, n): (P,). Spearman: Pearson of average ranks;
    Kendall: tau-b. Zero where either side is constant."""
    if method == "spearman":
        ry = stats.rankdata(y)
        rx = stats.rankdata(x_perms, axis=1)
        dx = rx - rx.mean(axis=1, keepdims=True)
        dy = ry - ry.mean()
        denominator = np.sqrt((dx * dx).sum(axis=1) * (dy * dy).sum())
        numerator = dx @ dy
    elif method == "kendall":
        i, j = np.triu_indices(len(y), k=1)
        sy = np.sign(y[i] - y[j])
        sx = np.sign(x_perms[:, i] - x_perms[:, j])
        numerator = sx @ sy
        denominator = np.sqrt(np.abs(sx).sum(axis=1) * np.abs(sy).sum())
    else:
        raise ValueError(f"method must be 'spearman' or 'kendall', got '{method}'")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), 0.0)


def _seed_groups(table, seed_column, size_column, value_column):
    _check_columns(table, (seed_column, size_column, value_column))
    if (table[size_column] <= 0).any():
        raise ValueError("sizes must be positive (their log is taken)")
    groups = []
    for name, group in table.groupby(seed_column, sort=True):
        x = np.log(group[size_column].to_numpy(dtype=np.float64))
        y = group[value_column].to_numpy(dtype=np.float64)
        if not np.isfinite(y).all():
            raise ValueError(f"seed {_name(name)!r} has a non-finite value")
        if len(np.unique(x)) < 2:
            raise ValueError(f"seed {_name(name)!r} has fewer than 2 distinct sizes; a trend needs at least 2")
        groups.append((name, x, y))
    if not groups:
        raise ValueError("empty table")
    return groups


def seed_correlations(table: pd.DataFrame, method: str = "spearman", seed_column: str = "seed",
                      size_column: str = "size", value_column: str = "value") -> pd.Series:
    """Within-seed rank correlation of value with log(size), one per seed (index: seeds)."""
    groups = _seed_groups(table, seed_column, size_column, value_column)
    return pd.Series([float(_rank_correlations(x[None, :], y, method)[0]) for _, x, y in groups],
                     index=pd.Index([g[0] for g in groups], name=seed_column), name=f"{method}_vs_log_size")


@dataclass(frozen=True)
class TrendTest:
    estimate: float  # mean over seeds of the within-seed rank correlation with log(size)
    p_value: float
    n_models: int  # distinct sizes
    n_seeds: int
    method: str
    alternative: str
    exact: bool
    n_permutations: int  # the size of the null distribution used


def permutation_trend(table: pd.DataFrame, method: str = "spearman", alternative: str = "two-sided",
                      seed_column: str = "seed", size_column: str = "size", value_column: str = "value",
                      n_permutations: int = 10000, max_exact: int = 50000, seed: int = 0) -> TrendTest:
    """Permutation test of the mean within-seed rank correlation of value with log(size), size labels permuted
    within seeds. alternative: "two-sided" (|T*| >= |T|), "greater" (T* >= T) or "less" (T* <= T)."""
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', got '{alternative}'")
    groups = _seed_groups(table, seed_column, size_column, value_column)
    observed = float(np.mean([_rank_correlations(x[None, :], y, method)[0] for _, x, y in groups]))
    n_combinations = math.prod(math.factorial(len(x)) for _, x, _ in groups)
    exact = n_combinations <= max_exact
    if exact:
        null = np.zeros(1)
        for _, x, y in groups:
            perms = np.array(list(itertools.permutations(x)))
            null = (null[:, None] + _rank_correlations(perms, y, method)[None, :]).ravel()
        null = null / len(groups)
    else:
        rng = np.random.default_rng(seed)
        null = np.zeros(n_permutations)
        for _, x, y in groups:
            perms = rng.permuted(np.tile(x, (n_permutations, 1)), axis=1)
            null += _rank_correlations(perms, y, method)
        null /= len(groups)
    tolerance = 1e-12
    if alternative == "two-sided":
        extreme = np.abs(null) >= abs(observed) - tolerance
    elif alternative == "greater":
        extreme = null >= observed - tolerance
    else:
        extreme = null <= observed + tolerance
    count = int(extreme.sum())
    p_value = count / len(null) if exact else (1 + count) / (1 + len(null))
    n_models = int(pd.unique(table[size_column]).size)
    return TrendTest(observed, float(p_value), n_models, len(groups), method, alternative, exact, len(null))


@dataclass(frozen=True)
class MixedSlope:
    slope: float  # b1: change in value per unit of log(size) (log base log_base)
    ci_low: float
    ci_high: float
    p_value: float  # Wald test of b1 = 0
    seed_variance: float  # s_u^2
    n_models: int
    n_seeds: int
    converged: bool


def mixed_slope(table: pd.DataFrame, seed_column: str = "seed", size_column: str = "size",
                value_column: str = "value", confidence: float = 0.95, log_base: float = math.e) -> MixedSlope:
    """REML fit of value ~ log(size) with a random intercept per seed (statsmodels MixedLM); needs statsmodels."""
    try:
        import statsmodels.api as sm
        from statsmodels.tools.sm_exceptions import ConvergenceWarning
    except ImportError as error:  # optional dependency
        raise ImportError("mixed_slope needs statsmodels: pip install statsmodels") from error
    _check_columns(table, (seed_column, size_column, value_column))
    if (table[size_column] <= 0).any():
        raise ValueError("sizes must be positive (their log is taken)")
    n_seeds = int(table[seed_column].nunique())
    n_models = int(table[size_column].nunique())
    if n_seeds < 2:
        raise ValueError(f"a random intercept per seed needs at least 2 seeds, got {n_seeds}")
    if n_models < 2:
        raise ValueError(f"a slope needs at least 2 sizes, got {n_models}")
    log_size = np.log(table[size_column].to_numpy(dtype=np.float64)) / math.log(log_base)
    exog = np.column_stack([np.ones(len(table)), log_size])
    model = sm.MixedLM(table[value_column].to_numpy(dtype=np.float64), exog, groups=table[seed_column].to_numpy())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = model.fit(reml=True)
    converged = bool(result.converged) and not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    low, high = np.asarray(result.conf_int(alpha=1 - confidence))[1]
    return MixedSlope(float(result.params[1]), float(low), float(high), float(result.pvalues[1]),
                      float(np.asarray(result.cov_re)[0, 0]), n_models, n_seeds, converged)


def verdict_row(claim: str, statistic: str, estimate: float, ci_low: float, ci_high: float, p_value: float | None,
                n_models: int, n_seeds: int, threshold: float, direction: str, alpha: float = 0.05,
                min_models: int = 3, *, null: float = 0.0, min_seeds: int = 1, power: float = 0.8) -> dict:
    """One row of a claims table. The claim: the true value of `statistic` lies beyond `threshold` on the
    side `direction` ("increasing"/"greater"/"positive": above; "decreasing"/"less"/"negative": below).
    `null` is the no-effect value (0 for slopes, correlations and log-ratios); the threshold must lie on the
    claimed side of it or at it. [ci_low, ci_high] should be a (1 - alpha) interval; p_value tests the null
    (None or NaN: not used). With "near" the CI end towards the null and "far" the end away from it:

    1. "underpowered" if n_models < min_models or n_seeds < min_seeds, or the estimate or CI is not finite;
    2. "holds" if the CI excludes the null on the claimed side (near end beyond the null), the estimate is
       beyond the threshold, and p_value < alpha;
    3. "does not hold" if the CI excludes the threshold on the other side (far end short of the threshold):
       the data rule out an effect as large as claimed (including an effect in the opposite direction);
    4. "underpowered" if the CI contains both the null and the threshold: too wide to tell no effect from the
       claimed one (with threshold == null, this is any CI that contains the null);
    5. "inconclusive" otherwise (e.g. an effect beyond the null but short of the threshold with the
       threshold still inside the CI, or a CI and p-value that disagree).

    minimum_detectable_effect (added when the CI is finite): with SE = (ci_high - ci_low) / (2 z_{1-alpha/2}),
    MDE = (z_{1-alpha/2} + z_power) * SE, the smallest |true - null| that a two-sided level-alpha test of this
    precision detects with probability `power`. Returns a dict with keys claim, statistic, estimate, ci_low,
    ci_high, p_value, n_models, n_seeds, verdict, threshold[, minimum_detectable_effect].
    """
    s = _sign(direction)
    if s * (threshold - null) < 0:
        raise ValueError(f"threshold {threshold} lies on the wrong side of the null {null} for a '{direction}' claim")
    finite = all(np.isfinite(v) for v in (estimate, ci_low, ci_high))
    if finite and ci_low > ci_high:
        raise ValueError(f"ci_low {ci_low} > ci_high {ci_high}")
    near, far = (ci_low, ci_high) if s > 0 else (ci_high, ci_low)
    p_ok = p_value is None or not np.isfinite(p_value) or p_value < alpha
    if n_models < min_models or n_seeds < min_seeds or not finite:
        verdict = "underpowered"
    elif s * (near - null) > 0 and s * (estimate - threshold) > 0 and p_ok:
        verdict = "holds"
    elif s * (far - threshold) < 0:
        verdict = "does not hold"
    elif s * (near - null) <= 0 and s * (far - threshold) >= 0:
        verdict = "underpowered"
    else:
        verdict = "inconclusive"
    row = {"claim": claim, "statistic": statistic, "estimate": estimate, "ci_low": ci_low, "ci_high": ci_high,
           "p_value": p_value, "n_models": n_models, "n_seeds": n_seeds, "verdict": verdict, "threshold": threshold}
    if np.isfinite(ci_low) and np.isfinite(ci_high) and 0 < alpha < 1 and 0 < power < 1:
        z = stats.norm.ppf(1 - alpha / 2)
        row["minimum_detectable_effect"] = float((z + stats.norm.ppf(power)) * (ci_high - ci_low) / (2 * z))
    return row


def threshold_verdict(claim: str, statistic: str, estimate: float, ci_low: float, ci_high: float, n_models: int,
                      n_seeds: int, threshold: float | tuple[float, float], direction: str,
                      p_value: float | None = None, min_models: int = 1) -> dict:
    """A claim that a statistic lies beyond a threshold ("at least half of the fits ...": direction "greater" or
    "less"), or inside a range (threshold=(low, high), direction "inside"), judged by its CI alone:

    1. "underpowered" if n_models < min_models or the estimate or CI is not finite;
    2. "holds" if the whole CI lies on the claimed side of the threshold (inside the range);
    3. "does not hold" if the whole CI lies on the other side (outside the range, not touching it);
    4. "inconclusive" otherwise: the CI contains the threshold (overlaps the range's edge).

    Returns the contract's keys (claim, statistic, estimate, ci_low, ci_high, p_value, n_models, n_seeds, verdict)
    and `threshold`.
    """
    finite = all(np.isfinite(v) for v in (estimate, ci_low, ci_high))
    if finite and ci_low > ci_high:
        raise ValueError(f"ci_low {ci_low} > ci_high {ci_high}")
    if direction == "inside":
        low, high = threshold
        inside, outside = low <= ci_low and ci_high <= high, ci_high < low or ci_low > high
    else:
        s = _sign(direction)
        inside = s * (ci_low if s > 0 else ci_high) > s * threshold
        outside = s * (ci_high if s > 0 else ci_low) < s * threshold
    if n_models < min_models or not finite:
        verdict = "underpowered"
    else:
        verdict = "holds" if inside else "does not hold" if outside else "inconclusive"
    return {"claim": claim, "statistic": statistic, "estimate": estimate, "ci_low": ci_low, "ci_high": ci_high,
            "p_value": p_value, "n_models": n_models, "n_seeds": n_seeds, "verdict": verdict,
            "threshold": list(threshold) if isinstance(threshold, tuple) else threshold}
