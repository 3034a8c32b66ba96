"""The BM25 filter against a brute-force loop over the paper's formula."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from influence_core.tfidf import BM25Index, recall_of_top, tfidf_candidates

CORPUS = [
    "Water is composed of hydrogen and oxygen.",
    "The water of the lake, the water of the sea: water everywhere.",
    "Oxygen is a gas; hydrogen is a gas too.",
    "The first President of the United States was George Washington.",
    "A recipe: 2 eggs, flour and water.",
    "Nothing in common here at all",
]


def brute_force(query: str, corpus, k1: float, b: float) -> list[float]:
    words = lambda text: re.findall(r"\w+", text.lower())
    docs = [words(d) for d in corpus]
    avgdl = sum(len(d) for d in docs) / len(docs)
    out = []
    for doc in docs:
        total = 0.0
        for term in set(words(query)):
            count = sum(term in set(d) for d in docs)
            idf = math.log((len(docs) - count + 0.5) / (count + 0.5) + 1)
            present = 1.0 if term in set(doc) else 0.0
            total += idf * present * (k1 + 1) / (present + k1 * (1 - b + b * len(doc) / avgdl)) if present else 0.0
        out.append(total)
    return out


@pytest.mark.parametrize("b", [0.75, 0.0])
def test_scores_equal_the_formula(b):
    queries = ["Water is composed of hydrogen and oxygen.", "george WASHINGTON was the first", "zebra"]
    index = BM25Index.build(CORPUS, k1=1.5, b=b)
    got = index.scores(queries)
    expected = np.array([brute_force(q, CORPUS, 1.5, b) for q in queries])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got[2].max() == 0  # an unseen term matches nothing


def test_top_k_and_recall():
    kept = tfidf_candidates(CORPUS, {"water": "Water is composed of hydrogen and oxygen."}, k=2)
    assert kept["water"][0] == 0 and len(kept["water"]) == 2
    assert tfidf_candidates(CORPUS, {"q": "water"}, k=100)["q"].__len__() == len(CORPUS)
    assert recall_of_top([0, 1, 2, 3], [0, 2, 5]) == 0.5


@pytest.mark.parametrize("k", [0, -3, 2.5])
def test_bad_k_is_refused(k):
    with pytest.raises(ValueError, match="k >= 1"):
        BM25Index.build(CORPUS).top_k(["water"], k)
