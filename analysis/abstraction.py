"""Abstraction statistics of the top influential sequences (paper Sec 5.3.1 and 5.3.5), for any corpus.

The paper's reading: a small model's top sequences share the query's tokens, a large model's share its theme;
top influences shrink with scale. Measured here on the score tables alone (no corpus metadata):

- Words: lower-cased word tokens (the BM25 filter's pattern, influence_core.tfidf), so the measure does not
  depend on a model's tokenizer and compares models of different vocabularies. Content words: minus scikit-
  learn's English stop words. Overlap of a sequence s with a text q (analysis.overlap.query_overlap):
  |C(q) & set(s)| / |C(q)|.
- Spurious rule first (analysis.spurious, the top_sequences table's `spurious`): among the candidates (a
  query's top sequences by influence, rank order), the flagged ones (||a||_2 / ||a||_1 > 2/3) are listed apart
  and left out; the top k are the first k positive, not-flagged candidates (`split_flagged`).
- (a) Overlap vs a BM25 baseline: B = the k best BM25 matches of the query text (prompt + completion) among
  the sequences that are not in the top k (`bm25_baseline`); D = mean overlap(top k, q) - mean overlap(B, q),
  with a bootstrap CI (analysis.overlap.overlap_vs_baseline, unpaired). BM25 picks the sequences a token-
  matching model would favour, so D near 0 reads "as token-matched as BM25", D << 0 "less".
- (b) Zero-overlap share: the share of the top k's positive influence held by sequences with no content word of
  the completion (analysis.overlap.zero_overlap_share).
- (c) Top-1 influence: the influence of the first kept sequence.
- Per model: the mean of D, of the zero-overlap share and the median top-1 influence over queries, each with a
  percentile bootstrap CI over queries (`model_summary`).
- Across sizes (`size_trend`): the mean within-seed Spearman correlation of a per-model value with log(size),
  its exact permutation p-value (analysis.trends.permutation_trend, sizes permuted within seeds) and a
  bootstrap CI over seeds; with one seed per size the CI does not exist and the verdict is "underpowered"
  (analysis.trends.verdict_row), since seed-to-seed variation cannot be told from a size effect.
- `weighted_share_difference`: share of the positive influence of a model's counted sequences held by kinds A
  minus kinds B, averaged over the models (seeds) given, with a nested bootstrap CI over models, then sequences
  (the role-play study's kinds on the synthetic world, the largest size's seeds pooled).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from analysis.bootstrap import bootstrap_ci, nested_bootstrap
from analysis.overlap import content_tokens, overlap_vs_baseline, query_overlaps, zero_overlap_share
from analysis.trends import permutation_trend, seed_correlations, verdict_row
from influence_core.tfidf import TOKEN_PATTERN

STOP_WORDS = frozenset(ENGLISH_STOP_WORDS)
_WORD = re.compile(TOKEN_PATTERN)


def words(text: str) -> list[str]:
    """Lower-cased word tokens of a text (the BM25 filter's token pattern)."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class FlaggedSplit:
    kept: pd.DataFrame  # per (model, query): the first k candidates with influence > 0 and not flagged
    flagged: pd.DataFrame  # every candidate flagged spurious (spurious == True)
    counts: pd.DataFrame  # per (model, query): candidates, flagged, kept, unchecked (kept rows without token scores)


def split_flagged(candidates: pd.DataFrame, k: int) -> FlaggedSplit:
    """Apply the spurious rule to a top_sequences table (columns model, query, rank, influence, spurious).

    Rows are taken in rank order per (model, query). `spurious` is True (flagged), False, or None/NaN (token
    scores not kept: not checked; kept, and counted as unchecked)."""
    missing = [c for c in ("model", "query", "rank", "influence", "spurious") if c not in candidates.columns]
    if missing:
        raise ValueError(f"the top_sequences table lacks {missing}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    candidates = candidates.reset_index(drop=True)  # tables concatenated over models repeat index labels
    group = pd.factorize(pd.Series(list(zip(candidates["model"], candidates["query"])), index=candidates.index))[0]
    ordered = candidates.assign(_group=group).sort_values(["_group", "rank"], kind="stable")
    flag = ordered["spurious"].map(_is_true).astype(bool)
    checked = ordered["spurious"].map(lambda v: v is not None and not (isinstance(v, float) and np.isnan(v)))
    kept_index = ordered[~flag & (ordered["influence"] > 0)].groupby("_group", sort=False).head(k).index
    kept_mask = ordered.index.isin(kept_index)
    counts = (ordered.assign(_flagged=flag, _kept=kept_mask, _unchecked=kept_mask & ~checked.astype(bool))
              .groupby("_group", sort=True)
              .agg(model=("model", "first"), query=("query", "first"), candidates=("rank", "size"),
                   flagged=("_flagged", "sum"), kept=("_kept", "sum"), unchecked=("_unchecked", "sum")))
    ordered = ordered.drop(columns="_group")
    return FlaggedSplit(ordered[kept_mask].reset_index(drop=True), ordered[flag.to_numpy()].reset_index(drop=True),
                        counts.reset_index(drop=True).astype({"flagged": int, "kept": int, "unchecked": int}))


def _is_true(value) -> bool:
    """spurious == True (bool, numpy bool or 1.0 after a round trip); None and NaN are not flagged."""
    return value is not None and not (isinstance(value, float) and np.isnan(value)) and bool(value)


def bm25_baseline(bm25_scores, exclude: Iterable[int], k: int) -> np.ndarray:
    """Indices of the k highest BM25 scores (N,) outside `exclude`, best first, ties by index (fewer if the rest
    is shorter)."""
    scores = np.asarray(bm25_scores, dtype=np.float64).ravel()
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    allowed = np.ones(len(scores), dtype=bool)
    allowed[[int(i) for i in exclude]] = False
    candidates = np.flatnonzero(allowed)
    order = np.argsort(-scores[candidates], kind="stable")
    return candidates[order[:k]]


def query_abstraction(top_influences: Sequence[float], top_texts: Sequence[str], baseline_texts: Sequence[str],
                      query_text: str, completion: str, stop_words: Iterable[str] = STOP_WORDS,
                      n_resamples: int = 2000, seed: int = 0) -> dict:
    """(a), (b), (c) for one (model, query): the kept top sequences (influences and texts, rank order) and the BM25
    baseline texts. Values that cannot be computed are NaN, with the reason in `note`."""
    stop = set(stop_words)
    top_words = [words(t) for t in top_texts]
    baseline_words = [words(t) for t in baseline_texts]
    row = {"n_top": len(top_texts), "n_baseline": len(baseline_texts),
           "top1_influence": float(top_influences[0]) if len(top_influences) else float("nan")}
    notes = []
    query_words = words(query_text)
    if not content_tokens(query_words, stop):
        notes.append("the query has no content words")
        row.update(top_overlap=np.nan, baseline_overlap=np.nan, overlap_difference=np.nan, ci_low=np.nan,
                   ci_high=np.nan)
    else:
        top = query_overlaps(top_words, query_words, stop)
        base = query_overlaps(baseline_words, query_words, stop)
        row.update(top_overlap=float(top.mean()) if len(top) else np.nan,
                   baseline_overlap=float(base.mean()) if len(base) else np.nan)
        if len(top) >= 2 and len(base) >= 2:
            d = overlap_vs_baseline(top, base, n_resamples=n_resamples, seed=seed)
            row.update(overlap_difference=d.difference, ci_low=d.ci_low, ci_high=d.ci_high)
        else:
            notes.append(f"{len(top)} top and {len(base)} baseline sequences; a difference needs 2 of each")
            row.update(overlap_difference=row["top_overlap"] - row["baseline_overlap"], ci_low=np.nan, ci_high=np.nan)
    completion_words = words(completion)
    if not content_tokens(completion_words, stop):
        notes.append("the completion has no content words")
        row.update(zero_overlap_share=np.nan, n_zero_overlap=0, n_positive=0)
    elif not len(top_texts):
        notes.append("no positive, not-flagged top sequence")
        row.update(zero_overlap_share=np.nan, n_zero_overlap=0, n_positive=0)
    else:
        z = zero_overlap_share(top_influences, top_words, completion_words, stop_tokens=stop)
        row.update(zero_overlap_share=z.share, n_zero_overlap=z.n_zero_overlap, n_positive=z.n_positive)
    row["note"] = "; ".join(notes)
    return row


def _interval(values: np.ndarray, statistic, n_resamples: int, seed: int) -> tuple[float, float, float]:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return np.nan, np.nan, np.nan
    if len(values) < 2:
        return float(statistic(values)), np.nan, np.nan
    interval = bootstrap_ci(values, statistic, n_resamples=n_resamples, seed=seed)
    return interval.estimate, interval.low, interval.high


def model_summary(per_query: pd.DataFrame, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per model (input order): mean overlap difference, mean zero-overlap share and median top-1 influence over its
    queries, each with a bootstrap CI over queries (NaN with fewer than 2 queries). Needs columns model,
    parameters, seed, overlap_difference, zero_overlap_share, top1_influence."""
    rows = []
    for model, group in per_query.groupby("model", sort=False):
        row = {"model": model, "parameters": int(group["parameters"].iloc[0]), "seed": group["seed"].iloc[0],
               "n_queries": len(group)}
        for column, statistic, name in (("overlap_difference", np.mean, "overlap_difference"),
                                        ("zero_overlap_share", np.mean, "zero_overlap_share"),
                                        ("top1_influence", np.median, "top1_influence")):
            estimate, low, high = _interval(group[column].to_numpy(dtype=np.float64), statistic, n_resamples, seed)
            row.update({name: estimate, f"{name}_ci_low": low, f"{name}_ci_high": high})
        rows.append(row)
    return pd.DataFrame(rows)


def size_trend(summary: pd.DataFrame, value_column: str, claim: str, direction: str, threshold: float,
               alpha: float = 0.05, min_models: int = 3, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Verdict row for "value_column changes with size in `direction`": mean within-seed Spearman rho with
    log(parameters), exact permutation p (one-sided), bootstrap CI over seeds (NaN with one seed: underpowered).
    summary: one row per model with columns parameters, seed, value_column."""
    table = summary[["seed", "parameters", value_column]].rename(columns={"parameters": "size", value_column: "value"})
    table = table[np.isfinite(table["value"].to_numpy(dtype=np.float64))]
    n_models, n_seeds = int(table["size"].nunique()), max(1, int(table["seed"].nunique()))
    statistic = f"Spearman(log size, {value_column}), mean over seeds"
    alternative = "greater" if direction in ("increasing", "greater", "positive") else "less"
    try:
        test = permutation_trend(table, alternative=alternative)
        estimate, p_value = test.estimate, test.p_value
    except ValueError:  # fewer than 2 sizes
        estimate, p_value = np.nan, None
        statistic += f" (needs at least 2 model sizes, got {n_models})"
    if n_seeds >= 2 and np.isfinite(estimate):
        interval = bootstrap_ci(seed_correlations(table).to_numpy(), n_resamples=n_resamples, seed=seed)
        low, high = interval.low, interval.high
    else:
        low = high = np.nan  # one seed per size: no interval over seeds
    row = verdict_row(claim, statistic, estimate, low, high, p_value, n_models, n_seeds, threshold, direction, alpha,
                      min_models)
    row["scope"] = f"across {n_models} sizes x {n_seeds} seeds"
    return row


def largest_size_claim(per_query: pd.DataFrame, value_column: str, claim: str, direction: str, threshold: float,
                       null: float = 0.0, alpha: float = 0.05, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Verdict row for the largest size's mean of value_column over its queries, its training seeds pooled: the
    estimate is the mean over every (seed, query) row of the largest `parameters`; the CI a nested bootstrap (seeds
    drawn, then queries within each drawn seed; queries alone with one seed). per_query: columns model, parameters,
    seed, value_column."""
    largest = per_query[per_query["parameters"] == per_query["parameters"].max()]
    largest = largest[np.isfinite(largest[value_column].to_numpy(dtype=np.float64))]
    models = list(dict.fromkeys(largest["model"]))
    units = [g[value_column].to_numpy(dtype=np.float64) for _, g in largest.groupby("seed", sort=True)]
    if len(largest) >= 2:
        interval = nested_bootstrap(units, np.mean, 1 - alpha, n_resamples, seed)
        estimate, low, high = interval.estimate, interval.low, interval.high
    else:
        estimate, low, high = (float(largest[value_column].mean()) if len(largest) else np.nan), np.nan, np.nan
    n_seeds = int(largest["seed"].nunique())
    row = verdict_row(claim, f"{', '.join(models)}: mean {value_column} over {len(largest)} (seed, query) rows",
                      estimate, low, high, None, 1, n_seeds, threshold, direction, alpha, min_models=1, null=null)
    row["scope"] = f"largest size ({len(models)} models)"
    return row


@dataclass(frozen=True)
class ShareDifference:
    share_a: float
    share_b: float
    difference: float  # share_a - share_b
    ci_low: float
    ci_high: float
    n_positive: int


def weighted_share_difference(groups: Sequence[tuple[Sequence[float], Sequence[str]]], kinds_a: Iterable[str],
                              kinds_b: Iterable[str], n_resamples: int = 2000, seed: int = 0,
                              confidence: float = 0.95) -> ShareDifference:
    """Share of positive influence held by kinds A minus kinds B, per model, averaged over the models (training
    seeds) of ``groups``: one (influences, kinds) pair per model, over its counted sequences.

    Per model, over its positive influences I_i with labels k_i: share_X = sum_{k_i in X} I_i / sum I_i. The
    estimate is the mean over models of share_A - share_B (each model weighs the same; influences of different
    models are never summed together, their scales differ). The CI is a nested percentile bootstrap: the models
    drawn with replacement (when there are several), then each drawn model's sequences.
    """
    kinds_a, kinds_b = set(kinds_a), set(kinds_b)
    prepared = []
    for influences, kinds in groups:
        values = np.asarray(influences, dtype=np.float64).ravel()
        if len(values) != len(kinds):
            raise ValueError(f"{len(values)} influences but {len(kinds)} kinds")
        positive = values > 0
        if positive.sum() == 0:
            raise ValueError("no positive influence among the sequences of a model")
        labels = np.asarray(kinds, dtype=object)[positive]
        prepared.append((values[positive], np.isin(labels, list(kinds_a)).astype(np.float64),
                         np.isin(labels, list(kinds_b)).astype(np.float64)))
    if not prepared:
        raise ValueError("no models given")

    def shares(v, in_a, in_b):
        return (v * in_a).sum() / v.sum(), (v * in_b).sum() / v.sum()

    per_model = np.array([shares(*g) for g in prepared])  # (models, 2)
    share_a, share_b = per_model.mean(axis=0)
    n_positive = sum(len(g[0]) for g in prepared)
    low = high = np.nan
    if n_positive >= 2:
        rng = np.random.default_rng(seed)
        draws = np.empty(n_resamples)
        for r in range(n_resamples):
            chosen = rng.integers(0, len(prepared), len(prepared)) if len(prepared) > 1 else [0]
            parts = []
            for m in chosen:
                v, in_a, in_b = prepared[m]
                pick = rng.integers(0, len(v), len(v))
                a, b = shares(v[pick], in_a[pick], in_b[pick])
                parts.append(a - b)
            draws[r] = np.mean(parts)
        tail = (1 - confidence) / 2
        low, high = (float(x) for x in np.quantile(draws, [tail, 1 - tail]))
    return ShareDifference(float(share_a), float(share_b), float(share_a - share_b), low, high, int(n_positive))
