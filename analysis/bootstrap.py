"""Bootstrap confidence intervals over the units of a study (queries, facts, sequences) and over seeds.

- bootstrap_ci: a statistic of n independent units, values (n,) or a tuple of paired (n,) arrays resampled
  together; percentile interval [q_{(1-c)/2}, q_{(1+c)/2}] of the statistic over B resamples with replacement,
  or BCa (bias-corrected and accelerated, Efron 1987) via scipy.stats.bootstrap.
- cluster_bootstrap: a long table (seed, unit, value) with seeds at the top: each replicate draws S seeds
  with replacement from the S seeds, then within every drawn seed draws its n_s units with replacement (all
  rows of a drawn unit travel together), and applies the statistic to the pooled values; percentile interval.
  Either level can be held fixed (resample=("unit",) keeps every seed once; resample=("seed",) keeps every
  unit of a drawn seed). With one seed, only the unit level varies.
- Paired log-ratios: for rows i with a_i > 0 and b_i > 0, r_i = ln(a_i / b_i), summarised by their mean
  (ln of the geometric-mean ratio) with a bootstrap CI over rows. This replaces ln(mean a / mean b), a ratio of
  noisy means that one large row can dominate. A row with b_i <= 0 (or a_i <= 0, or non-finite) is refused
  with a ValueError naming it: pass magnitudes |a|, |b| explicitly if that is what the ratio means.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from scipy import stats


@dataclass(frozen=True)
class Interval:
    estimate: float  # the statistic on the data as given
    low: float
    high: float
    confidence: float
    n: int  # units (bootstrap_ci) or seeds (cluster_bootstrap) at the top level
    method: str


def _as_samples(values) -> tuple[np.ndarray, ...]:
    samples = values if isinstance(values, tuple) else (values,)
    arrays = tuple(np.asarray(s, dtype=np.float64) for s in samples)
    if any(a.ndim != 1 for a in arrays):
        raise ValueError("bootstrap samples must be 1-D arrays of per-unit values")
    if len({len(a) for a in arrays}) != 1:
        raise ValueError(f"paired samples differ in length: {[len(a) for a in arrays]}")
    if len(arrays[0]) < 2:
        raise ValueError(f"need at least 2 units to bootstrap, got {len(arrays[0])}")
    return arrays


def bootstrap_ci(values, statistic: Callable = np.mean, confidence: float = 0.95, n_resamples: int = 2000,
                 method: str = "percentile", seed: int = 0) -> Interval:
    """CI of statistic(*samples) over units resampled with replacement.

    values: (n,) or a tuple of equal-length (n,) arrays (paired: row i of each is resampled together).
    statistic: called as statistic(*samples) (with axis=-1 when it accepts `axis`, as np.mean does).
    method: "percentile", "basic" or "BCa". A degenerate bootstrap distribution (e.g. a constant sample)
    gives the point interval [estimate, estimate].
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    samples = _as_samples(values)
    estimate = float(statistic(*samples))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)  # degenerate BCa: handled below
        result = stats.bootstrap(samples, statistic, paired=True, confidence_level=confidence,
                                 n_resamples=n_resamples, method=method, rng=np.random.default_rng(seed))
    distribution = np.asarray(result.bootstrap_distribution)
    if np.ptp(distribution) == 0:
        low = high = float(distribution.flat[0])
    else:
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return Interval(estimate, low, high, confidence, len(samples[0]), method)


def cluster_bootstrap(table: pd.DataFrame, statistic: Callable = np.mean, seed_column: str = "seed",
                      unit_column: str = "unit", value_column: str = "value", confidence: float = 0.95,
                      n_resamples: int = 2000, resample: Sequence[str] = ("seed", "unit"), seed: int = 0) -> Interval:
    """Hierarchical (seed, then unit within seed) percentile bootstrap of statistic(pooled values (k,)).

    table: long format, one row per observation, columns seed_column, unit_column, value_column. Several rows
    of one (seed, unit) are resampled together. resample: the levels drawn with replacement.
    """
    missing = [c for c in (seed_column, unit_column, value_column) if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks columns {missing}")
    if not set(resample) <= {"seed", "unit"} or not resample:
        raise ValueError(f"resample must name 'seed' and/or 'unit', got {tuple(resample)}")
    values = table[value_column].to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        bad = table.index[~np.isfinite(values)][0]
        raise ValueError(f"row {bad.item() if isinstance(bad, np.generic) else bad!r}: value is not finite")
    # seeds -> list of units -> value arrays
    clusters = [[group[value_column].to_numpy(dtype=np.float64) for _, group in by_seed.groupby(unit_column, sort=True)]
                for _, by_seed in table.groupby(seed_column, sort=True)]
    if not clusters:
        raise ValueError("empty table")
    rng = np.random.default_rng(seed)
    draws = np.empty(n_resamples)
    n_seeds = len(clusters)
    for b in range(n_resamples):
        seeds = rng.integers(0, n_seeds, n_seeds) if "seed" in resample else range(n_seeds)
        parts = []
        for s in seeds:
            units = clusters[s]
            picks = rng.integers(0, len(units), len(units)) if "unit" in resample else range(len(units))
            parts.extend(units[u] for u in picks)
        draws[b] = statistic(np.concatenate(parts))
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return Interval(float(statistic(values)), float(low), float(high), confidence, n_seeds,
                    "cluster percentile (" + ", then ".join(r for r in ("seed", "unit") if r in resample) + ")")


def nested_bootstrap(units_by_seed: Sequence[np.ndarray], statistic: Callable[[np.ndarray], float],
                     confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> Interval:
    """CI of statistic(rows) for units that are rows of any shape (e.g. a query's layer profile (D,)), grouped by
    training seed: units_by_seed[s] is (n_s, ...). Each replicate draws the seeds with replacement (when there
    are several), then n_s units with replacement within each drawn seed, stacks them and applies the statistic;
    percentile interval, NaN replicates (e.g. a resample lacking one kind of unit) left out."""
    groups = [np.asarray(u, dtype=np.float64) for u in units_by_seed if len(u)]
    if not groups:
        raise ValueError("no units to resample")
    rng = np.random.default_rng(seed)
    draws = np.empty(n_resamples)
    for b in range(n_resamples):
        chosen = rng.integers(0, len(groups), len(groups)) if len(groups) > 1 else [0]
        draws[b] = statistic(np.concatenate([groups[s][rng.integers(0, len(groups[s]), len(groups[s]))]
                                             for s in chosen]))
    draws = draws[np.isfinite(draws)]
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail]) if len(draws) else (np.nan, np.nan)
    return Interval(float(statistic(np.concatenate(groups))), float(low), float(high), confidence, len(groups),
                    "nested percentile (seeds, then units)" if len(groups) > 1 else "percentile over units")


def seeded_ci(table: pd.DataFrame, statistic: Callable = np.mean, seed_column: str = "seed",
              unit_column: str = "unit", value_column: str = "value", confidence: float = 0.95,
              n_resamples: int = 2000, seed: int = 0) -> Interval:
    """A CI over a study's units that honours its training seeds: with one seed, bootstrap_ci over the rows (one
    row per unit); with several, cluster_bootstrap (seeds drawn, then units within each drawn seed)."""
    if table[seed_column].nunique() <= 1:
        return bootstrap_ci(table[value_column].to_numpy(dtype=np.float64), statistic, confidence, n_resamples,
                            seed=seed)
    return cluster_bootstrap(table, statistic, seed_column, unit_column, value_column, confidence, n_resamples,
                             seed=seed)


def paired_log_ratios(numerator, denominator, labels=None) -> np.ndarray:
    """r_i = ln(a_i / b_i) for paired (n,) arrays; ValueError naming the first row with b_i <= 0 or a_i <= 0.

    labels: row names for the message (default: the index of a pandas Series numerator, else positions).
    """
    if labels is None:
        labels = numerator.index if isinstance(numerator, pd.Series) else None
    a = np.asarray(numerator, dtype=np.float64)
    b = np.asarray(denominator, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"numerator and denominator must be 1-D of one length, got {a.shape} and {b.shape}")
    names = list(range(len(a))) if labels is None else [n.item() if isinstance(n, np.generic) else n for n in labels]
    for i in range(len(a)):
        if not (np.isfinite(a[i]) and np.isfinite(b[i])):
            raise ValueError(f"row {names[i]!r}: non-finite value (numerator {a[i]}, denominator {b[i]})")
        if b[i] <= 0:
            raise ValueError(f"row {names[i]!r}: denominator {b[i]} <= 0; a log-ratio needs positive values")
        if a[i] <= 0:
            raise ValueError(f"row {names[i]!r}: numerator {a[i]} <= 0; a log-ratio needs positive values")
    return np.log(a) - np.log(b)


@dataclass(frozen=True)
class LogRatio:
    mean_log_ratio: float  # mean_i ln(a_i / b_i)
    ci_low: float
    ci_high: float
    ratio: float  # exp(mean_log_ratio): the geometric-mean ratio
    ratio_low: float
    ratio_high: float
    n: int


def mean_log_ratio(numerator, denominator, labels=None, confidence: float = 0.95, n_resamples: int = 2000,
                   method: str = "percentile", seed: int = 0) -> LogRatio:
    """Mean of the paired log-ratios ln(a_i / b_i) with a bootstrap CI over rows (see paired_log_ratios)."""
    r = paired_log_ratios(numerator, denominator, labels)
    interval = bootstrap_ci(r, np.mean, confidence, n_resamples, method, seed)
    return LogRatio(interval.estimate, interval.low, interval.high, float(np.exp(interval.estimate)),
                    float(np.exp(interval.low)), float(np.exp(interval.high)), len(r))
