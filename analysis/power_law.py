"""Heavy tails of influence (paper Sec 5.2.1, Figs 8-9, Table 1).

Power law on the tail: p(x) ~ x^(-alpha) for x >= x_min, fitted by maximum likelihood (Clauset, Shalizi and
Newman 2009, Eq 3.1: alpha = 1 + n / sum ln(x_i / x_min)), x_min fixed at the tail threshold as in the paper
(fit on the top fraction of positive influences). Goodness of fit: the KS distance D and the semi-parametric bootstrap p-value
(the share of synthetic power-law samples, refitted the same way, whose D is at least the observed one;
plausible if p > 0.1). Alternatives compared by the normalised log-likelihood ratio R (R > 0 favours the
power law) and its p-value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import warnings

import numpy as np
import powerlaw

ALTERNATIVES = ("exponential", "lognormal", "stretched_exponential", "truncated_power_law")


@dataclass
class PowerLawFit:
    alpha: float  # exponent of the density, p(x) ~ x^-alpha
    alpha_standard_error: float
    x_min: float
    tail_size: int
    ks_distance: float
    ks_p_value: float  # bootstrap; > 0.1: a power law is plausible
    bootstrap_samples: int
    likelihood_ratios: dict[str, tuple[float, float]]  # alternative -> (normalised R, p); R > 0 favours power law

    def as_row(self) -> dict:
        row = {k: v for k, v in asdict(self).items() if k != "likelihood_ratios"}
        for name, (ratio, p) in self.likelihood_ratios.items():
            row[f"R_vs_{name}"] = ratio
            row[f"p_vs_{name}"] = p
        return row


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


def fit_power_law_tail(influences: np.ndarray, tail_fraction: float = 0.1, min_tail: int = 20,
                       bootstrap_samples: int = 200, seed: int = 0) -> PowerLawFit:
    """Fit the top `tail_fraction` of the positive influences (at least `min_tail` values)."""
    positive = np.sort(np.asarray(influences, dtype=np.float64)[np.asarray(influences) > 0])[::-1]
    if not np.isfinite(positive).all():
        raise ValueError("influences contain NaN or inf")
    tail_size = max(min_tail, int(round(tail_fraction * len(positive))))
    if len(positive) < min_tail:
        raise ValueError(f"only {len(positive)} positive influences; need at least {min_tail} to fit a tail")
    tail_size = min(tail_size, len(positive))
    x_min = float(positive[tail_size - 1])
    tail = positive[:tail_size]
    alpha, standard_error = power_law_mle(tail, x_min)
    distance = ks_distance(tail, x_min, alpha)

    rng = np.random.default_rng(seed)
    exceed = 0
    for _ in range(bootstrap_samples):
        # inverse-CDF sample of the fitted power law above x_min, refitted the same way
        synthetic = x_min * (1 - rng.random(tail_size)) ** (-1 / (alpha - 1))
        exceed += ks_distance(synthetic, x_min, power_law_mle(synthetic, x_min)[0]) >= distance
    # powerlaw caps alpha at 3 by default; widen the range so steep tails are compared fairly
    fit = powerlaw.Fit(tail, xmin=x_min, verbose=False, parameter_ranges={"alpha": [1.0001, 50.0]})
    ratios = {}
    for name in ALTERNATIVES:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the package warns when an alternative's optimiser hits a bound
            ratio, p = fit.distribution_compare("power_law", name, normalized_ratio=True)
        ratios[name] = (float(ratio), float(p))
    return PowerLawFit(alpha, float(standard_error), x_min, tail_size, distance,
                       exceed / bootstrap_samples if bootstrap_samples else float("nan"), bootstrap_samples, ratios)


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
