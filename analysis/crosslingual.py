"""The cross-lingual statistic (paper Sec 5.3.1, Figs 15-16) on a languages x sequences influence table.

A grid is one (model, query)'s table: index = languages, English ("en") first, then e.g. "ko", "tr"; columns =
the query's top English sequences 1..k; cell (L, j) = the influence of sequence j (L = en) or of its translation
into L; NaN where sequence j has no translation into L.

- english_scale: s = mean_j e_j, the mean English influence of the table's k sequences (positive for top
  sequences); NaN when s <= 0 or not finite, and then every relative value below is NaN (no scale to divide by).
- relative_grid: grid / s (the heat map's values: the English row averages 1).
- paired_differences: d_j = (t_j - e_j) / s over the columns j with a translation into L: a paired difference in
  units of one positive scale per table, never a ratio over a per-sequence English denominator.
- translated_minus_english: D = mean_j d_j with a paired bootstrap CI over the columns (analysis/bootstrap).
  With every column translated, D = mean(t) / mean(e) - 1: D = -1 when the translations have no influence (the
  paper's 810M result), D = 0 when they are as influential as the English sequences.
- pooled_translated_minus_english: the d_j of several queries pooled; cluster bootstrap (queries, then columns).
- size_trend: the rank correlation of a per-query value with model size, queries as blocks
  (analysis/trends.permutation_trend, one-sided "increases"), with a bootstrap CI over queries of the per-query
  correlations; NaN where there are fewer than 2 sizes (and then analysis/trends.verdict_row says underpowered).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd

from analysis.bootstrap import bootstrap_ci, cluster_bootstrap
from analysis.trends import permutation_trend, seed_correlations

LANGUAGE_NAMES = {"en": "English", "ko": "Korean", "tr": "Turkish"}


def _check_grid(grid: pd.DataFrame) -> None:
    if len(grid.index) == 0 or grid.index[0] != "en":
        raise ValueError(f"a cross-lingual grid has the English row 'en' first, got rows {list(grid.index)}")


def english_scale(grid: pd.DataFrame) -> float:
    """s = mean of the English row; NaN when it is not a positive finite number."""
    _check_grid(grid)
    english = grid.loc["en"].to_numpy(dtype=np.float64)
    if not np.isfinite(english).all() or len(english) == 0:
        raise ValueError(f"the English row must hold a finite influence for every sequence, got {english.tolist()}")
    scale = float(english.mean())
    return scale if scale > 0 else float("nan")


def relative_grid(grid: pd.DataFrame) -> pd.DataFrame:
    """grid / english_scale(grid) (all NaN without a positive scale)."""
    return grid.astype(np.float64) / english_scale(grid)


def paired_differences(grid: pd.DataFrame, language: str) -> pd.Series:
    """d_j = (t_j - e_j) / s over the columns with a translation into `language` (index: those columns)."""
    if language not in grid.index or language == "en":
        raise ValueError(f"no row '{language}' to compare with English (rows {list(grid.index)})")
    relative = relative_grid(grid)
    translated = grid.loc[language].notna()
    return (relative.loc[language] - relative.loc["en"])[translated].rename(f"{language}_minus_en")


@dataclass(frozen=True)
class Difference:
    estimate: float  # D = mean of d_j (NaN without translated columns or without a scale)
    ci_low: float  # NaN with fewer than 2 differences
    ci_high: float
    n_sequences: int  # translated columns used
    n_queries: int
    translated: float  # mean_j t_j / s over the same columns
    english: float  # mean_j e_j / s over the same columns (1 when every column is translated)


def translated_minus_english(grid: pd.DataFrame, language: str, confidence: float = 0.95, n_resamples: int = 2000,
                             seed: int = 0) -> Difference:
    """D for one grid, with a paired percentile bootstrap CI over its translated columns."""
    d = paired_differences(grid, language)
    relative = relative_grid(grid)[d.index]
    values = d.to_numpy(dtype=np.float64)
    if len(values) == 0 or not np.isfinite(values).all():
        return Difference(float("nan"), float("nan"), float("nan"), len(values), 1, float("nan"), float("nan"))
    low = high = float("nan")
    if len(values) >= 2:
        interval = bootstrap_ci(values, np.mean, confidence, n_resamples, seed=seed)
        low, high = interval.low, interval.high
    return Difference(float(values.mean()), low, high, len(values), 1,
                      float(relative.loc[language].mean()), float(relative.loc["en"].mean()))


def pooled_translated_minus_english(grids: Mapping[str, pd.DataFrame], language: str, confidence: float = 0.95,
                                    n_resamples: int = 2000, seed: int = 0) -> Difference:
    """D over the d_j of several queries' grids pooled (queries without a scale or a translation are left out);
    CI: cluster bootstrap, queries drawn with replacement, then columns within each drawn query."""
    rows = []
    for query, grid in grids.items():
        d = paired_differences(grid, language)
        relative = relative_grid(grid)[d.index]
        for column, value in d.items():
            if np.isfinite(value):
                rows.append({"seed": query, "unit": column, "value": float(value),
                             "translated": float(relative.loc[language, column]),
                             "english": float(relative.loc["en", column])})
    if not rows:
        return Difference(float("nan"), float("nan"), float("nan"), 0, 0, float("nan"), float("nan"))
    table = pd.DataFrame(rows)
    n_queries = int(table["seed"].nunique())
    low = high = float("nan")
    if len(table) >= 2:
        interval = cluster_bootstrap(table, np.mean, confidence=confidence, n_resamples=n_resamples, seed=seed)
        low, high = interval.low, interval.high
    return Difference(float(table["value"].mean()), low, high, len(table), n_queries,
                      float(table["translated"].mean()), float(table["english"].mean()))


@dataclass(frozen=True)
class SizeTrend:
    estimate: float  # mean over queries of Spearman(value, log size); NaN with fewer than 2 sizes
    ci_low: float  # percentile bootstrap over queries of the per-query correlations; NaN with < 2 queries
    ci_high: float
    p_value: float  # permutation test, sizes permuted within queries, one-sided "increases"
    n_models: int
    n_queries: int


def size_trend(table: pd.DataFrame, query_column: str = "query", size_column: str = "size",
               value_column: str = "value", n_resamples: int = 2000, seed: int = 0) -> SizeTrend:
    """Does the value rise with model size? Queries without a finite value at every size are left out."""
    finite = table[np.isfinite(table[value_column].to_numpy(dtype=np.float64))]
    sizes = sorted(table[size_column].unique())
    complete = [q for q, group in finite.groupby(query_column, sort=True) if set(group[size_column]) == set(sizes)]
    kept = finite[finite[query_column].isin(complete)]
    if len(sizes) < 2 or not complete:
        return SizeTrend(float("nan"), float("nan"), float("nan"), float("nan"), len(sizes), len(complete))
    test = permutation_trend(kept, alternative="greater", seed_column=query_column, size_column=size_column,
                             value_column=value_column, seed=seed)
    low = high = float("nan")
    if len(complete) >= 2:
        rhos = seed_correlations(kept, seed_column=query_column, size_column=size_column, value_column=value_column)
        interval = bootstrap_ci(rhos.to_numpy(), np.mean, n_resamples=n_resamples, seed=seed)
        low, high = interval.low, interval.high
    return SizeTrend(test.estimate, low, high, test.p_value, len(sizes), len(complete))
