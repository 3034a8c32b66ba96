"""Token overlap between training sequences and a query, for the "abstraction vs scale" studies (Sec 5.3.1,
5.3.5): does a model's top influence come from sequences that share the query's tokens, or from sequences that
share none? Corpus-agnostic: tokens are any hashable ids (ints from a tokenizer, or strings).

- Content tokens of a query q: C(q) = set(q) - stop_tokens (distinct, stop tokens removed).
- Overlap of a sequence s with q: |C(q) & set(s)| / |C(q)|, in [0, 1] (share of the query's distinct content
  tokens that occur anywhere in s). Undefined (ValueError) when C(q) is empty.
- Top-k vs baseline: mean overlap of the top-k influential sequences minus that of a baseline set (e.g. BM25-
  matched sequences of the same query), D = mean(top) - mean(baseline), with a bootstrap CI: independent
  resampling of each set, or paired=True for a baseline matched one-to-one (D = mean of the pair differences).
  For several queries, compute D per query and take bootstrap_ci over queries (analysis.bootstrap).
- Zero-overlap share: among the top k sequences by influence, with P the positive ones,
  share = sum_{i in P, overlap(s_i, completion) = 0} I_i / sum_{i in P} I_i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy import stats


def _token_set(tokens) -> set:
    if isinstance(tokens, np.ndarray):
        tokens = tokens.tolist()
    return set(tokens)


def content_tokens(query_tokens, stop_tokens: Iterable | None = None) -> set:
    """C(q): the distinct tokens of the query that are not stop tokens."""
    return _token_set(query_tokens) - (_token_set(stop_tokens) if stop_tokens is not None else set())


def query_overlap(sequence_tokens, query_tokens, stop_tokens: Iterable | None = None) -> float:
    """|C(q) & set(s)| / |C(q)| for one sequence s and query q (token lists); ValueError if C(q) is empty."""
    content = content_tokens(query_tokens, stop_tokens)
    if not content:
        raise ValueError("the query has no content tokens (all are stop tokens, or it is empty)")
    return len(content & _token_set(sequence_tokens)) / len(content)


def query_overlaps(sequences: Sequence, query_tokens, stop_tokens: Iterable | None = None) -> np.ndarray:
    """query_overlap of each of N sequences (a list of token lists) -> (N,)."""
    content = content_tokens(query_tokens, stop_tokens)
    if not content:
        raise ValueError("the query has no content tokens (all are stop tokens, or it is empty)")
    return np.array([len(content & _token_set(s)) / len(content) for s in sequences], dtype=np.float64)


@dataclass(frozen=True)
class OverlapDifference:
    top_mean: float
    baseline_mean: float
    difference: float  # top_mean - baseline_mean
    ci_low: float
    ci_high: float
    n_top: int
    n_baseline: int
    paired: bool


def overlap_vs_baseline(top_overlaps, baseline_overlaps, paired: bool = False, confidence: float = 0.95,
                        n_resamples: int = 2000, seed: int = 0) -> OverlapDifference:
    """D = mean(top) - mean(baseline) for overlaps (n_top,) and (n_baseline,), with a percentile bootstrap CI.

    paired=False resamples each set on its own; paired=True needs n_top == n_baseline and resamples pairs.
    A degenerate bootstrap distribution (e.g. both sets constant) gives the point interval.
    """
    top = np.asarray(top_overlaps, dtype=np.float64).ravel()
    baseline = np.asarray(baseline_overlaps, dtype=np.float64).ravel()
    if len(top) < 2 or len(baseline) < 2:
        raise ValueError(f"need at least 2 overlaps per set, got {len(top)} top and {len(baseline)} baseline")
    if not (np.isfinite(top).all() and np.isfinite(baseline).all()):
        raise ValueError("overlaps contain NaN or inf")
    if paired and len(top) != len(baseline):
        raise ValueError(f"paired sets differ in length: {len(top)} top, {len(baseline)} baseline")

    def difference(a, b, axis=-1):
        return np.mean(a, axis=axis) - np.mean(b, axis=axis)

    result = stats.bootstrap((top, baseline), difference, paired=paired, confidence_level=confidence,
                             n_resamples=n_resamples, method="percentile", rng=np.random.default_rng(seed))
    distribution = np.asarray(result.bootstrap_distribution)
    if np.ptp(distribution) == 0:
        low = high = float(distribution.flat[0])
    else:
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return OverlapDifference(float(top.mean()), float(baseline.mean()), float(difference(top, baseline)), low, high,
                             len(top), len(baseline), paired)


@dataclass(frozen=True)
class ZeroOverlapShare:
    share: float  # of the top-k positive influence, held by sequences sharing no content token
    n_zero_overlap: int  # positive top-k sequences with zero overlap
    n_positive: int  # positive sequences among the top k
    total_positive_influence: float


def zero_overlap_share(influences, sequences: Sequence, completion_tokens, k: int | None = None,
                       stop_tokens: Iterable | None = None) -> ZeroOverlapShare:
    """Share of the top-k positive influence held by sequences with no content token of the completion.

    influences: (N,); sequences: N token lists (same order); k: top k by influence (None: all N; ties keep
    input order). Only positive influences count, in numerator and denominator.
    """
    values = np.asarray(influences, dtype=np.float64).ravel()
    if len(values) != len(sequences):
        raise ValueError(f"{len(values)} influences but {len(sequences)} sequences")
    if not np.isfinite(values).all():
        raise ValueError("influences contain NaN or inf")
    if k is not None and k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    order = np.argsort(-values, kind="stable")[: (len(values) if k is None else k)]
    top = [i for i in order if values[i] > 0]
    if not top:
        raise ValueError("no positive influence among the top sequences")
    overlaps = query_overlaps([sequences[i] for i in top], completion_tokens, stop_tokens)
    positive = values[top]
    zero = overlaps == 0
    total = float(positive.sum())
    return ZeroOverlapShare(float(positive[zero].sum() / total), int(zero.sum()), len(top), total)
