"""Building blocks of the heavy-tail analysis (paper Sec 5.2.1, Figs 8-9): the continuous power law's maximum-
likelihood exponent and KS distance above a fixed x_min (Clauset, Shalizi and Newman 2009, Eq 3.1-3.2), the
share of positive influence held by the top fraction, and the survival curve of Fig 8. The full Table 1 fit
(x_min choice, bootstrap KS p-value, likelihood-ratio tests against other tails) is analysis/tails.py fit_tail.
"""

from __future__ import annotations

import numpy as np


def power_law_mle(tail: np.ndarray, x_min: float) -> tuple[float, float]:
    """(alpha, its standard error) of a continuous power law above a fixed x_min (Clauset et al. Eq 3.1-3.2)."""
    n = len(tail)
    alpha = 1.0 + n / float(np.log(tail / x_min).sum())
    return alpha, (alpha - 1.0) / np.sqrt(n)


def ks_distance(tail: np.ndarray, x_min: float, alpha: float) -> float:
    """max |empirical CDF - fitted CDF| with F(x) = 1 - (x / x_min)^(1 - alpha)."""
    x = np.sort(tail)
    fitted = 1.0 - (x / x_min) ** (1.0 - alpha)
    n = len(x)
    upper = np.arange(1, n + 1) / n
    lower = np.arange(0, n) / n
    return float(max(np.max(upper - fitted), np.max(fitted - lower)))


def top_share(influences: np.ndarray, fractions=(0.001, 0.01, 0.1)) -> dict[float, float]:
    """Share of the total positive influence held by the top fraction of sequences (paper Fig 9)."""
    positive = np.sort(np.clip(np.asarray(influences, dtype=np.float64), 0, None))[::-1]
    total = positive.sum()
    if total <= 0:
        raise ValueError("no positive influence to share out")
    return {f: float(positive[: max(1, int(np.ceil(f * len(positive))))].sum() / total) for f in fractions}


def survival(influences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points of the empirical 1 - CDF of the positive influences, for a log-log plot (paper Fig 8)."""
    positive = np.sort(np.asarray(influences, dtype=np.float64)[np.asarray(influences) > 0])
    return positive, 1.0 - np.arange(len(positive)) / len(positive)
