"""Memorisation (paper Sec 5.3.3): do a query's top influential sequences contain the passage it completes?

For a completion c = (c_1 .. c_m) (token ids) and a sequence s, the longest common contiguous token n-gram
L(s, c) = max { n : c_i..c_{i+n-1} = s_j..s_{j+n-1} for some i, j }; its coverage is L / m. The sequence
contains the passage when the coverage is 1. Pure functions of token-id lists.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def longest_common_ngram(sequence: Sequence[int], completion: Sequence[int]) -> int:
    """Length of the longest contiguous run of tokens shared by both (dynamic programming, O(|s| |c|))."""
    if not len(sequence) or not len(completion):
        return 0
    best, previous = 0, [0] * (len(completion) + 1)
    for token in sequence:
        current = [0] * (len(completion) + 1)
        for j, other in enumerate(completion, start=1):
            if token == other:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def passage_coverage(sequences: Sequence[Sequence[int]], completion: Sequence[int]) -> np.ndarray:
    """L(s, c) / |c| for each sequence: 1.0 where the sequence contains the whole completion."""
    if not len(completion):
        raise ValueError("the completion has no tokens: nothing to look for")
    return np.array([longest_common_ngram(s, completion) / len(completion) for s in sequences], dtype=float)


def contains_passage_at_k(coverages: Sequence[float], k: int) -> bool:
    """Whether any of the first k (top-ranked) sequences contains the whole completion."""
    return bool(np.any(np.asarray(coverages[:k], dtype=float) >= 1.0))
