"""TF-IDF filter (paper Sec 3.2): keep, per query, the top-k training sequences by a modified Okapi BM25.

Binary term presence (a term counts once per document and once per query), k1 = 1.5, and

    IDF(t) = log((C - n(t) + 0.5) / (n(t) + 0.5) + 1)       C documents, n(t) of them contain t
    score(q, d) = sum_{t in q, t in d} IDF(t) (k1 + 1) / (1 + k1 (1 - b + b |d| / avgdl))

with |d| the document's length in tokens. The paper does not state b; the default 0.75 is Okapi's usual value
(b = 0 removes length normalisation). Terms: scikit-learn's CountVectorizer (lower-cased word tokens, single
characters kept), so the matrix is sparse and the scoring is one sparse product per query set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import CountVectorizer

TOKEN_PATTERN = r"(?u)\b\w+\b"


@dataclass
class BM25Index:
    """A binary term-presence index of the training texts."""

    vectorizer: CountVectorizer
    presence: sparse.csr_matrix  # (C, V) 0/1
    idf: np.ndarray  # (V,)
    length_factor: np.ndarray  # (C,) (k1 + 1) / (1 + k1 (1 - b + b |d| / avgdl))
    k1: float
    b: float

    @classmethod
    def build(cls, texts: Sequence[str], k1: float = 1.5, b: float = 0.75) -> "BM25Index":
        if k1 < 0 or not 0 <= b <= 1:
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        if len(texts) == 0:
            raise ValueError("no training texts to index; the data set is empty")
        vectorizer = CountVectorizer(token_pattern=TOKEN_PATTERN, lowercase=True, dtype=np.float64)
        counts = vectorizer.fit_transform(texts).tocsr()
        lengths = np.asarray(counts.sum(axis=1)).ravel()
        presence = (counts > 0).astype(np.float64).tocsr()
        num_docs = presence.shape[0]
        containing = np.asarray(presence.sum(axis=0)).ravel()
        idf = np.log((num_docs - containing + 0.5) / (containing + 0.5) + 1.0)
        avgdl = max(float(lengths.mean()), 1e-12)
        length_factor = (k1 + 1.0) / (1.0 + k1 * (1.0 - b + b * lengths / avgdl))
        return cls(vectorizer, presence, idf, length_factor, k1, b)

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """BM25 score of every (query, document) pair: (len(queries), C). Query terms unseen in training add 0."""
        query_terms = (self.vectorizer.transform(queries) > 0).astype(np.float64)  # (Q, V) binary
        weighted = query_terms.multiply(self.idf[None, :]).tocsr()  # IDF of each query term
        matched = (weighted @ self.presence.T).toarray()  # (Q, C) sum of IDF over shared terms
        return matched * self.length_factor[None, :]

    def top_k(self, queries: Sequence[str], k: int) -> np.ndarray:
        """Indices of the k best-matching documents per query, best first: (Q, min(k, C)); ties by index."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"the TF-IDF filter keeps k >= 1 sequences per query (paper: 10,000), got k={k!r}")
        scores = self.scores(queries)
        k = min(int(k), scores.shape[1])
        order = np.argsort(-scores, axis=1, kind="stable")
        return order[:, :k]


def tfidf_candidates(train_texts: Sequence[str], query_texts: dict[str, str], k: int, k1: float = 1.5,
                     b: float = 0.75) -> dict[str, list[int]]:
    """query name -> the training indices its BM25 filter keeps (top k, best first); query text = prompt + completion."""
    index = BM25Index.build(train_texts, k1=k1, b=b)
    names = list(query_texts)
    top = index.top_k([query_texts[n] for n in names], k)
    return {name: [int(i) for i in row] for name, row in zip(names, top)}


def recall_of_top(reference_top: Sequence[int], kept: Sequence[int]) -> float:
    """Share of the reference's top sequences (e.g. unfiltered top 100 by influence) that the filter keeps."""
    reference = set(int(i) for i in reference_top)
    if not reference:
        raise ValueError("no reference sequences to measure recall against")
    return len(reference & set(int(i) for i in kept)) / len(reference)
