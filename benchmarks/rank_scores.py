"""One scoring pass shared by the low-rank and TF-IDF benchmarks: full-rank and rank-r influence of a diverse
query set over a random pool of training sequences, written as resumable shards under artifacts/bench/.

Rank-r scores are computed with the rank-r matrices U_s V^T themselves (dense contraction): the same numbers
as the factored contraction (tests/test_lowrank.py checks this), so every rank shares one pass.
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.setup import ARTIFACTS, as_engine_queries, diverse_queries, load_bench
from influence_core import ScoreArguments, encode_queries, iterate_batches, precondition_queries, query_gradients
from influence_core import model_fingerprint
from influence_core.lowrank import compress_query
from influence_core.sharding import ShardArguments, read_scores, score_in_shards, scores_matrix

RANKS = (1, 4, 8, 16, 32, 64)


def rank_variant_scores(model_choice: str = "auto", num_queries: int = 16, pool: int = 1200, seed: int = 0):
    """Returns (bench, query list, pool row indices, full (Q, P) scores, {rank: (Q, P) scores}, preconditioned)."""
    bench = load_bench(model_choice)
    queries = diverse_queries(bench.queries, num_queries)
    gradients = query_gradients(bench.model, bench.layers, bench.task,
                                iterate_batches(encode_queries(bench.tokenizer, as_engine_queries(queries)), 16),
                                progress=False)
    preconditioned = precondition_queries(gradients, bench.factors)
    variants = {n: torch.cat([q] + [compress_query(q, r).dense() for r in RANKS]) for n, q in preconditioned.items()}
    names = [q.name for q in queries]
    variant_names = names + [f"{n}@r{r}" for r in RANKS for n in names]
    total = len(bench.encoded["input_ids"])
    rows = np.sort(np.random.default_rng(seed).permutation(total)[: min(pool, total)])
    train = {k: v[torch.as_tensor(rows)] for k, v in bench.encoded.items()}
    model = model_fingerprint(bench.layers)  # a retrained model gets fresh shards
    out = ARTIFACTS / "bench" / f"rank-scores-{bench.name}-{model}-{num_queries}q-{len(rows)}-seed{seed}"
    score_in_shards(bench.model, bench.layers, bench.task, train, variants, variant_names, out,
                    ShardArguments(shard_size=100, batch_size=8, top_k_tokens=0), ScoreArguments(progress=True))
    matrix = scores_matrix(read_scores(out), variant_names, len(rows))
    q = len(names)
    full = matrix[:q]
    by_rank = {r: matrix[q * (i + 1): q * (i + 2)] for i, r in enumerate(RANKS)}
    return bench, queries, rows, full, by_rank, preconditioned
