"""The paper's spurious-sequence rule (Sec 3 / App: token-wise attribution, Eq 31).

A training sequence whose influence is carried by a single token is likely spurious (e.g. a rare token that
the query shares). With a = (a_1, ..., a_T) the sequence's token-wise influences (Eq 31, summed over layers):

    ratio(a) = ||a||_2 / ||a||_1 = sqrt(sum_t a_t^2) / sum_t |a_t|,  in [1 / sqrt(T), 1]

ratio = 1 when one token holds all the influence, 1 / sqrt(T) when it is spread evenly over T tokens. A sequence
is flagged when ratio > 2/3 (strictly); the paper's figures show the top sequences that are not flagged.
Since the minimum 1 / sqrt(T) exceeds 2/3 for T <= 2, sequences of one or two tokens are always flagged.
An all-zero vector has no dominant token: its ratio is NaN and it is not flagged.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

SPURIOUS_THRESHOLD = 2.0 / 3.0


def concentration_ratio(token_influences) -> np.ndarray:
    """||a||_2 / ||a||_1 over the last axis: (..., T) -> (...); NaN where a is all zero."""
    a = np.asarray(token_influences, dtype=np.float64)
    if a.ndim == 0:
        raise ValueError("token influences need a token axis (..., T)")
    l1 = np.abs(a).sum(axis=-1)
    l2 = np.sqrt((a * a).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(l1 > 0, l2 / np.where(l1 > 0, l1, 1.0), np.nan)


def is_spurious(token_influences, threshold: float = SPURIOUS_THRESHOLD) -> np.ndarray:
    """Flag (...,) of token influences (..., T): ratio > threshold (NaN ratios are not flagged)."""
    ratio = concentration_ratio(token_influences)
    return np.where(np.isnan(ratio), False, ratio > threshold)


class SpuriousSplit(NamedTuple):
    kept: pd.DataFrame  # rows with ratio <= threshold (or all-zero), input order, plus a `ratio_column`
    flagged: pd.DataFrame  # rows with ratio > threshold, input order, plus a `ratio_column`
    n_flagged: int


def split_spurious(sequences: pd.DataFrame, token_column: str = "token_scores",
                   threshold: float = SPURIOUS_THRESHOLD, ratio_column: str = "l2_over_l1") -> SpuriousSplit:
    """Split a table of top sequences by the rule: each row's `token_column` holds a list/array of its T token
    influences (T may differ between rows). Returns (kept, flagged, n_flagged); both keep the input order and
    the row index, with the ratio added as `ratio_column`."""
    if token_column not in sequences.columns:
        raise ValueError(f"no column '{token_column}' in the table (columns: {list(sequences.columns)})")
    ratios = []
    for label, scores in sequences[token_column].items():
        values = np.asarray(scores, dtype=np.float64)
        if values.ndim != 1 or len(values) == 0:
            raise ValueError(f"row {label!r}: '{token_column}' must be a non-empty 1-D list of token scores")
        ratios.append(float(concentration_ratio(values)))
    table = sequences.assign(**{ratio_column: ratios})
    flags = np.array([r > threshold for r in ratios], dtype=bool)  # NaN > t is False
    flagged = table[flags]
    return SpuriousSplit(table[~flags], flagged, int(flags.sum()))
