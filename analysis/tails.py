"""Table 1 of the paper: is the tail of the positive influences a power law? (Sec 5.2.1; Clauset, Shalizi and
Newman 2009, "Power-law distributions in empirical data", SIAM Review 51:661.)

Input: a 1-D array of influences of any sign; only the strictly positive values are used.

Model: a continuous power law above x_min, p(x) = (alpha - 1) / x_min * (x / x_min)^(-alpha) for x >= x_min.
- alpha, by maximum likelihood (Clauset Eq 3.1): alpha = 1 + m / sum_{x_i >= x_min} ln(x_i / x_min), with
  standard error (alpha - 1) / sqrt(m), m the tail size (analysis.power_law.power_law_mle).
- x_min, three ways:
  * x_min="ks" (default, Clauset Sec 3.3): the candidate minimising the KS distance
    D = max_x |S(x) - P(x)| between the empirical and fitted CDFs of the tail. Candidates are the observed
    values whose tail holds at least `min_tail` points; when there are more than `max_candidates`, tail sizes
    are taken geometrically spaced between min_tail and the number of positives (dense where tails are short);
    max_tail caps the tail sizes scanned (for millions of values).
  * tail_fraction=f (the paper's choice: the top 0.01%): x_min is the smallest of the top round(f * n)
    positives (at least min_tail of them).
  * x_min=<number>: fixed.
- Goodness of fit (Clauset Sec 4.1): the semi-parametric bootstrap p-value. Each replicate has n values (n the
  number of positives): Binomial(n, m / n) of them drawn from the fitted power law above x_min, the rest drawn
  with replacement from the observed positives below x_min; the same x_min rule is applied and refitted and
  its D computed. p = share of replicates with D >= the observed D. A power law is plausible if p > 0.1.
- Alternatives (Clauset Sec 5): Vuong's normalised log-likelihood ratio R = sum_i (ln p_pl(x_i) - ln p_alt(x_i))
  / (sqrt(m) * sd_i) over the tail, each alternative fitted by maximum likelihood to the same tail (above the
  same x_min, with its normalisation truncated there), and its two-sided p-value erfc(|R| / sqrt(2)).
  R > 0 favours the power law, R < 0 the alternative; the sign means something only if p is small (< 0.1).
  The truncated power law contains the power law (nested): its p-value is the chi-squared (1 dof) test of
  2 * log-likelihood ratio. Computed with the `powerlaw` package (Alstott et al. 2014). Names follow that
  package: "stretched_exponential" is the Weibull, p(x) ~ (x / lambda)^(beta - 1) exp(-(x / lambda)^beta).
  (Table 1 of the paper also lists Rayleigh and Gumbel tails, which the package does not fit.)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import powerlaw

from analysis.power_law import ks_distance, power_law_mle

ALTERNATIVES = ("exponential", "lognormal", "stretched_exponential", "truncated_power_law")


@dataclass
class TailFit:
    alpha: float  # exponent of the density, p(x) ~ x^-alpha
    alpha_standard_error: float
    x_min: float
    tail_size: int  # m: positives >= x_min
    n_positive: int
    x_min_method: str  # "ks", "tail_fraction" or "fixed"
    ks_distance: float
    ks_p_value: float  # semi-parametric bootstrap; NaN without replicates
    bootstrap_samples: int
    likelihood_ratios: dict[str, tuple[float, float]] = field(default_factory=dict)  # alt -> (R, p); R > 0: power law

    def as_row(self) -> dict:
        """Table 1 layout: alpha, x_min, tail_size, ks_p_value, then R_vs_<alt>, p_vs_<alt> per alternative."""
        row = {"alpha": self.alpha, "x_min": self.x_min, "tail_size": self.tail_size, "ks_p_value": self.ks_p_value}
        for name, (ratio, p) in self.likelihood_ratios.items():
            row[f"R_vs_{name}"] = ratio
            row[f"p_vs_{name}"] = p
        return row


def _positives(influences) -> np.ndarray:
    values = np.asarray(influences, dtype=np.float64).ravel()
    if not np.isfinite(values).all():
        raise ValueError("influences contain NaN or inf")
    return np.sort(values[values > 0])


def _candidate_starts(n: int, min_tail: int, max_candidates: int) -> np.ndarray:
    """Start indices i (tail = x[i:], ascending x) whose tail holds at least min_tail points."""
    if n - min_tail + 1 <= max_candidates:
        return np.arange(0, n - min_tail + 1)
    sizes = np.unique(np.round(np.geomspace(min_tail, n, max_candidates)).astype(int))
    return n - sizes


def scan_x_min(sorted_positive: np.ndarray, min_tail: int = 20,
               max_candidates: int = 200) -> tuple[float, float, float]:
    """Clauset's x_min: the candidate minimising the KS distance of the fitted tail. Input sorted ascending, > 0.

    Returns (x_min, alpha, D). For each candidate start i, tail x[i:] of size m: alpha_i = 1 + m / (sum ln x[i:]
    - m ln x[i]); D_i = max |empirical CDF - (1 - (x / x[i])^(1 - alpha_i))| over the tail.
    """
    x = sorted_positive
    n = len(x)
    if n < min_tail:
        raise ValueError(f"only {n} positive influences; need at least {min_tail} to fit a tail")
    logs = np.log(x)
    suffix = np.cumsum(logs[::-1])[::-1]  # suffix[i] = sum_{j >= i} ln x_j
    best = (np.inf, float("nan"), float("nan"))
    for i in _candidate_starts(n, min_tail, max_candidates):
        m = n - i
        spread = suffix[i] - m * logs[i]
        if spread <= 0:  # all tail values equal: no exponent
            continue
        alpha = 1.0 + m / spread
        fitted = 1.0 - np.exp((1.0 - alpha) * (logs[i:] - logs[i]))
        steps = np.arange(1, m + 1) / m
        distance = max(np.max(steps - fitted), np.max(fitted - (steps - 1.0 / m)))
        if distance < best[0]:
            best = (distance, float(x[i]), alpha)
    if not np.isfinite(best[0]):
        raise ValueError("no candidate x_min gives a tail with distinct values")
    return best[1], best[2], float(best[0])


def _fit_rule(top: np.ndarray, n: int, rule: str, fixed: float | None, tail_fraction: float | None, min_tail: int,
              max_candidates: int) -> tuple[float, float, float, int]:
    """(x_min, alpha, D, m) under one x_min rule. top: the largest of n positives, ascending: all of them, or
    at least the ones the rule can reach (the top max_tail for "ks", the top m for "tail_fraction", every
    value >= x_min for "fixed")."""
    if rule == "ks":
        x_min, alpha, distance = scan_x_min(top, min_tail, max_candidates)
        return x_min, alpha, distance, int(np.sum(top >= x_min))
    if rule == "tail_fraction":
        x_min = float(top[len(top) - _fraction_size(n, tail_fraction, min_tail)])
    else:
        x_min = float(fixed)
    tail = top[top >= x_min]
    if len(tail) < 2 or np.all(tail == tail[0]):
        raise ValueError(f"the tail above x_min={x_min:g} has {len(tail)} points; too few distinct values to fit")
    alpha, _ = power_law_mle(tail, x_min)
    return x_min, alpha, ks_distance(tail, x_min, alpha), len(tail)


def _fraction_size(n: int, tail_fraction: float, min_tail: int) -> int:
    return min(n, max(min_tail, int(round(tail_fraction * n))))


def compare_alternatives(tail: np.ndarray, x_min: float, alternatives=ALTERNATIVES) -> dict[str, tuple[float, float]]:
    """Vuong's normalised R and p of the power law against each alternative, all fitted above x_min.

    tail: (m,) values >= x_min. Returns {alternative: (R, p)}; R > 0 favours the power law.
    """
    # powerlaw caps alpha at 3 by default; widen the range so steep tails are compared fairly
    fit = powerlaw.Fit(np.asarray(tail, dtype=np.float64), xmin=x_min, verbose=False,
                       parameter_ranges={"alpha": [1.0001, 50.0]})
    ratios = {}
    for name in alternatives:
        if name not in ALTERNATIVES:
            raise ValueError(f"unknown alternative '{name}'; choose from {ALTERNATIVES}")
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the package warns when an alternative's optimiser hits a bound
            ratio, p = fit.distribution_compare("power_law", name, normalized_ratio=True)
        ratios[name] = (float(ratio), float(p))
    return ratios


def fit_tail(influences, x_min: float | str = "ks", tail_fraction: float | None = None, min_tail: int = 20,
             bootstrap_samples: int = 200, alternatives=ALTERNATIVES, max_candidates: int = 200,
             max_tail: int | None = None, seed: int = 0) -> TailFit:
    """Power-law fit of the positive influences' tail, bootstrap KS p-value and likelihood-ratio tests.

    influences: (N,) any sign, positives used. x_min: "ks" (Clauset's scan) or a number; tail_fraction: the top
    fraction of positives instead (the paper's 0.01% is 1e-4). max_tail: with "ks", scan only tails of at most
    this many points (needed for millions of values: each scan and each bootstrap replicate then touches only
    the top max_tail). See the module docstring for every formula.
    """
    x = _positives(influences)
    if tail_fraction is not None:
        if not isinstance(x_min, str):
            raise ValueError("give either a numeric x_min or tail_fraction, not both")
        if not 0 < tail_fraction <= 1:
            raise ValueError(f"tail_fraction must lie in (0, 1], got {tail_fraction}")
        rule, fixed = "tail_fraction", None
    elif isinstance(x_min, str):
        if x_min != "ks":
            raise ValueError(f"x_min must be 'ks' or a number, got '{x_min}'")
        rule, fixed = "ks", None
    else:
        if x_min <= 0:
            raise ValueError(f"x_min must be positive, got {x_min}")
        rule, fixed = "fixed", float(x_min)
    if len(x) < min_tail:
        raise ValueError(f"only {len(x)} positive influences; need at least {min_tail} to fit a tail")
    n = len(x)
    if rule == "ks":
        if max_tail is not None and max_tail < min_tail:
            raise ValueError(f"max_tail {max_tail} is below min_tail {min_tail}")
        reach = n if max_tail is None else min(n, max_tail)  # how many of the largest values the rule looks at
    elif rule == "tail_fraction":
        reach = _fraction_size(n, tail_fraction, min_tail)
    else:
        reach = int(np.sum(x >= fixed))
    found_x_min, alpha, distance, m = _fit_rule(x[n - reach:], n, rule, fixed, tail_fraction, min_tail,
                                                max_candidates)
    tail = x[n - reach:][x[n - reach:] >= found_x_min]  # the values the rule saw (ties below them excluded)
    body = x[x < found_x_min]  # ascending

    rng = np.random.default_rng(seed)
    exceed = 0
    for _ in range(bootstrap_samples):
        if rule == "fixed" or len(body) == 0:
            size = m
        else:
            size = rng.binomial(n, m / n)
        synthetic_tail = found_x_min * (1.0 - rng.random(size)) ** (-1.0 / (alpha - 1.0))
        if size >= reach:  # the rule only sees power-law draws (all >= x_min > any body value)
            top = np.sort(synthetic_tail)[size - reach:]
        else:  # plus the largest (reach - size) of the n - size body draws; body is sorted, so largest index
            picks = rng.integers(0, len(body), n - size)
            need = min(reach - size, n - size)
            largest = np.partition(picks, len(picks) - need)[len(picks) - need:] if need > 0 else picks[:0]
            top = np.sort(np.concatenate([body[largest], synthetic_tail]))
        try:
            replicate = _fit_rule(top, n, rule, fixed, tail_fraction, min_tail, max_candidates)[2]
        except ValueError:  # a degenerate replicate (too small a tail) counts as a worse fit
            replicate = np.inf
        exceed += replicate >= distance
    p_value = exceed / bootstrap_samples if bootstrap_samples else float("nan")
    _, standard_error = power_law_mle(tail, found_x_min)
    ratios = compare_alternatives(tail, found_x_min, alternatives) if alternatives else {}
    return TailFit(float(alpha), float(standard_error), found_x_min, int(m), n, rule, float(distance), p_value,
                   bootstrap_samples, ratios)
