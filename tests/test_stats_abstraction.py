"""Abstraction statistics (analysis/abstraction.py) on hand-made score tables with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.abstraction import (bm25_baseline, largest_size_claim, model_summary, query_abstraction, size_trend,
                                  split_flagged, weighted_share_difference, words)


def candidates() -> pd.DataFrame:
    """Two queries of one model; q1's rank 2 is flagged, rank 4 negative; q2's rank 1 has no token scores."""
    return pd.DataFrame({
        "model": ["m"] * 7, "query": ["q1"] * 4 + ["q2"] * 3, "rank": [1, 2, 3, 4, 1, 2, 3],
        "train_id": [10, 11, 12, 13, 20, 21, 22], "influence": [5.0, 4.0, 3.0, -1.0, 2.0, 1.5, 1.0],
        "spurious": [False, True, False, False, None, np.nan, True]})


def test_flagged_sequences_are_left_out_and_counted():
    shuffled = split_flagged(candidates().sample(frac=1, random_state=1), k=2)  # ranks, not row order, count
    assert shuffled.kept.sort_values("train_id")["train_id"].tolist() == [10, 12, 20, 21]
    split = split_flagged(candidates(), k=2)
    assert split.kept["train_id"].tolist() == [10, 12, 20, 21]  # q1: ranks 1, 3 (2 flagged); q2: ranks 1, 2
    assert split.flagged["train_id"].tolist() == [11, 22]
    counts = split.counts.set_index("query")
    assert counts.loc["q1", ["candidates", "flagged", "kept", "unchecked"]].tolist() == [4, 1, 2, 0]
    assert counts.loc["q2", ["candidates", "flagged", "kept", "unchecked"]].tolist() == [3, 1, 2, 2]
    only_one = split_flagged(candidates(), k=5)  # the negative rank 4 is never kept
    assert only_one.kept[only_one.kept["query"] == "q1"]["train_id"].tolist() == [10, 12]
    with pytest.raises(ValueError, match="lacks \\['spurious'\\]"):
        split_flagged(candidates().drop(columns="spurious"), 2)


def test_bm25_baseline_skips_the_top_k():
    scores = [0.5, 3.0, 2.0, 2.0, 0.0, 1.0]
    assert bm25_baseline(scores, exclude=[1], k=3).tolist() == [2, 3, 5]  # tie 2/3 by index
    assert bm25_baseline(scores, exclude=[1, 2, 3, 5], k=3).tolist() == [0, 4]  # fewer left than k


def test_query_abstraction_known_values():
    assert words("The Ring, brought to Mount-Doom!") == ["the", "ring", "brought", "to", "mount", "doom"]
    query = "The Ring was brought to Mount Doom by Frodo Baggins"  # content: ring brought mount doom frodo baggins
    top = ["Frodo carried the ring", "Sam and Frodo at Mount Doom", "a story of hobbits"]
    baseline = ["The ring was brought to Mount Doom", "Mount Doom is a volcano"]
    row = query_abstraction([3.0, 2.0, 1.0], top, baseline, query, " Frodo Baggins.", n_resamples=300)
    # overlaps: top 2/6, 3/6, 0 -> mean 5/18; baseline 4/6, 2/6 -> mean 1/2
    assert row["top_overlap"] == pytest.approx(5 / 18) and row["baseline_overlap"] == pytest.approx(0.5)
    assert row["overlap_difference"] == pytest.approx(5 / 18 - 0.5)
    assert row["ci_low"] <= row["overlap_difference"] <= row["ci_high"]
    # zero overlap with {frodo, baggins}: only "a story of hobbits" (influence 1 of 6)
    assert row["zero_overlap_share"] == pytest.approx(1 / 6) and row["n_zero_overlap"] == 1
    assert row["top1_influence"] == 3.0 and row["note"] == ""
    empty = query_abstraction([], [], baseline, "the of and", " the", n_resamples=50)
    assert np.isnan(empty["overlap_difference"]) and np.isnan(empty["zero_overlap_share"])
    assert "no content words" in empty["note"]


def per_query_table(values: dict[str, list[float]], sizes: dict[str, int], seed: int = 0) -> pd.DataFrame:
    rows = []
    for model, column in values.items():
        for i, v in enumerate(column):
            rows.append({"model": model, "parameters": sizes[model], "seed": seed, "query": f"q{i}",
                         "overlap_difference": v, "zero_overlap_share": v + 1, "top1_influence": 10 * v})
    return pd.DataFrame(rows)


def test_model_summary_means_and_intervals():
    table = per_query_table({"small": [-0.1, -0.3], "large": [-0.5, -0.5, -0.8]}, {"small": 10, "large": 100})
    summary = model_summary(table, n_resamples=200).set_index("model")
    assert summary.loc["small", "overlap_difference"] == pytest.approx(-0.2)
    assert summary.loc["large", "top1_influence"] == pytest.approx(-5.0)  # median of -5, -5, -8
    assert summary.loc["large", "zero_overlap_share"] == pytest.approx(1 - 0.6)
    assert summary.loc["small", "overlap_difference_ci_low"] >= -0.3 - 1e-12
    assert summary.loc["small", "overlap_difference_ci_high"] <= -0.1 + 1e-12
    single = model_summary(per_query_table({"one": [0.2]}, {"one": 5}), n_resamples=50).iloc[0]
    assert single["overlap_difference"] == 0.2 and np.isnan(single["overlap_difference_ci_low"])


def summary_table(per_seed: list[list[float]], sizes=(10, 100, 1000, 10000)) -> pd.DataFrame:
    return pd.DataFrame([{"model": f"s{seed}m{j}", "parameters": size, "seed": seed, "value": v}
                         for seed, values in enumerate(per_seed) for j, (size, v) in enumerate(zip(sizes, values))])


def test_size_trend_with_one_seed_is_underpowered():
    row = size_trend(summary_table([[0.4, 0.3, 0.2, 0.1]]), "value", "value falls with size", "decreasing", -0.5)
    assert row["estimate"] == pytest.approx(-1.0)
    assert row["p_value"] == pytest.approx(1 / 24)  # exact: one of 4! orders is as extreme
    assert np.isnan(row["ci_low"]) and row["n_seeds"] == 1 and row["verdict"] == "underpowered"


def test_size_trend_with_seeds_holds_and_one_size_is_underpowered():
    table = summary_table([[0.4, 0.3, 0.2, 0.1], [0.5, 0.2, 0.1, 0.0], [0.3, 0.25, 0.2, 0.15]])
    row = size_trend(table, "value", "value falls with size", "decreasing", -0.5, n_resamples=200)
    assert row["estimate"] == pytest.approx(-1.0) and row["p_value"] == pytest.approx(1 / 24 ** 3)
    assert (row["ci_low"], row["ci_high"]) == (-1.0, -1.0) and row["verdict"] == "holds"
    rising = size_trend(table, "value", "value rises with size", "increasing", 0.5, n_resamples=200)
    assert rising["verdict"] == "does not hold"
    one = size_trend(summary_table([[0.4]], sizes=(10,)), "value", "c", "decreasing", -0.5)
    assert one["verdict"] == "underpowered" and "needs at least 2 model sizes, got 1" in one["statistic"]


def test_largest_size_claim_pools_the_seeds_of_the_largest_size():
    """The largest size's mean over its (seed, query) rows, the smaller size left out; the CI from seeds then queries."""
    rows = [{"model": f"{size}_s{seed}", "parameters": params, "seed": seed, "overlap_difference": value}
            for size, params, by_seed in (("small", 10, {0: [0.9, 0.8], 1: [0.7, 0.9]}),
                                          ("large", 100, {0: [-0.2, -0.4], 1: [-0.3, -0.5]}))
            for seed, values in by_seed.items() for value in values]
    table = pd.DataFrame(rows)
    row = largest_size_claim(table, "overlap_difference", "less token-matched than BM25", "decreasing", -0.1,
                             n_resamples=300)
    assert row["estimate"] == pytest.approx(-0.35) and row["n_seeds"] == 2 and row["n_models"] == 1
    assert -0.5 <= row["ci_low"] <= row["ci_high"] <= -0.2 and row["verdict"] == "holds"
    assert "large_s0, large_s1" in row["statistic"] and "4 (seed, query) rows" in row["statistic"]
    weak = largest_size_claim(table, "overlap_difference", "c", "decreasing", -0.9, n_resamples=300)
    assert weak["verdict"] == "does not hold"  # the CI excludes an effect as large as -0.9


def test_weighted_share_difference():
    influences = [4.0, 3.0, 2.0, 1.0, -5.0]
    kinds = ["ai_fiction", "ordinary_dialogue", "ai_shutdown", "other", "ai_fiction"]
    result = weighted_share_difference([(influences, kinds)], {"ai_shutdown", "ai_fiction"}, {"ordinary_dialogue"},
                                       n_resamples=300)
    assert (result.share_a, result.share_b) == pytest.approx((0.6, 0.3))  # negatives do not count
    assert result.difference == pytest.approx(0.3) and result.n_positive == 4
    assert result.ci_low <= 0.3 <= result.ci_high
    with pytest.raises(ValueError, match="no positive"):
        weighted_share_difference([([-1.0], ["other"])], {"other"}, set())


def test_weighted_share_difference_averages_seeds_without_pooling_their_scales():
    # model 1: A holds all of its influence (difference 1); model 2, with influences 100x larger: B holds all (-1)
    one = ([1.0, 2.0], ["a", "a"])
    two = ([100.0, 300.0], ["b", "b"])
    result = weighted_share_difference([one, two], {"a"}, {"b"}, n_resamples=400)
    assert result.difference == pytest.approx(0.0)  # the mean of +1 and -1, not the pooled -0.98
    assert (result.share_a, result.share_b) == pytest.approx((0.5, 0.5))
    assert result.n_positive == 4
    assert result.ci_low == pytest.approx(-1.0) and result.ci_high == pytest.approx(1.0)  # seeds drawn
