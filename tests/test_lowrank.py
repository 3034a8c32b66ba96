"""Query batching: the factored low-rank contraction against the dense scores and the truncated SVD."""

from __future__ import annotations

import pytest
import torch

from engine_models import gpt_neox, query_batches, token_batches
from influence_core import (CausalLMTask, FactorArguments, ScoreArguments, compute_scores, fit_factors,
                            precondition_queries, query_gradients, track_layers)
from influence_core.lowrank import LowRankQuery, compress_queries, compress_query, query_nbytes, uses_low_rank


@pytest.fixture(scope="module")
def setup():
    model = gpt_neox()
    layers = track_layers(model)
    task = CausalLMTask()
    factors = fit_factors(model, layers, task, token_batches(8), FactorArguments(dtype="float64", progress=False))
    q = precondition_queries(query_gradients(model, layers, task, query_batches(n=4), progress=False), factors)
    return model, layers, task, q


def scores(setup, **kwargs):
    model, layers, task, q = setup
    return compute_scores(model, layers, task, token_batches(9), q,
                          args=ScoreArguments(per_token=True, progress=False, **kwargs))


def test_full_rank_low_rank_path_equals_dense(setup):
    dense, factored = scores(setup), scores(setup, low_rank=True)
    torch.testing.assert_close(factored.total, dense.total)
    torch.testing.assert_close(factored.per_layer, dense.per_layer)
    torch.testing.assert_close(factored.per_token, dense.per_token)


def test_truncated_scores_equal_dense_scores_of_the_truncated_queries(setup):
    """Rank-2 factored contraction == dense contraction with the rank-2 reconstructed matrices (Eckart-Young)."""
    model, layers, task, q = setup
    truncated = {n: compress_query(v, 2).dense() for n, v in q.items()}
    expected = compute_scores(model, layers, task, token_batches(9), truncated,
                              args=ScoreArguments(per_token=True, progress=False))
    for budget in [0, 2**30]:  # 0: factored contraction only; else the cheaper of factored / dense per layer
        got = scores(setup, query_rank=2, low_rank_chunk=64, dense_query_bytes=budget)  # tiny chunk: query chunking
        torch.testing.assert_close(got.total, expected.total)
        torch.testing.assert_close(got.per_token, expected.per_token)
    # SVD truncation error = the discarded singular values
    v = next(iter(q.values()))
    s = torch.linalg.svdvals(v)
    err = (compress_query(v, 2).dense() - v).flatten(1).norm(dim=1)
    torch.testing.assert_close(err, s[:, 2:].norm(dim=1))


def test_path_choice_and_memory(setup):
    _, _, _, q = setup
    shapes = {n: v.shape for n, v in q.items()}  # gpt_neox: (12, 9) and (8, 13)
    assert not uses_low_rank((3, 12, 9), None) and not uses_low_rank((3, 12, 9), 9)
    assert uses_low_rank((3, 12, 9), 8)
    compressed = compress_queries(q, rank=8)
    for n, v in compressed.items():
        assert isinstance(v, LowRankQuery) == (8 < min(shapes[n][1:]))
    low = compress_queries(q, rank=1, force=True)
    assert query_nbytes(low) == sum(8 * (s[1] + s[2]) for s in shapes.values())
    assert query_nbytes(q) == sum(8 * s[1] * s[2] for s in shapes.values())


@pytest.mark.parametrize("rank", [0, -1, 1.5])
def test_bad_rank_is_refused(rank):
    with pytest.raises(ValueError, match="query_rank must be a positive integer"):
        ScoreArguments(query_rank=rank)


@pytest.mark.parametrize("shape", [(3, 40, 9), (3, 9, 40), (2, 12, 12)])
def test_gram_truncation_equals_the_svd_truncation(shape):
    """compress_query's Gram-matrix eigendecomposition gives the Eckart-Young rank-r matrix of a full SVD, tall and
    wide layers alike, with the SVD's convention (left = U_r S_r, right = V_r^T orthonormal rows), and stays exact on
    a rank-deficient query (zero singular values)."""
    from influence_core.lowrank import compress_query

    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x[-1] = torch.randn(shape[1], 2, generator=g, dtype=torch.float64) @ torch.randn(2, shape[2], generator=g,
                                                                                      dtype=torch.float64)  # rank 2
    for r in (1, 4, min(shape[1:])):
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        expected = (u[..., :r] * s[..., None, :r]) @ vh[..., :r, :]
        q = compress_query(x, r)
        torch.testing.assert_close(q.dense(), expected, rtol=0, atol=1e-10 * float(x.abs().max()))
        full_rank_rows = q.right[:-1] if r > 2 else q.right  # the rank-2 query's extra directions are arbitrary
        eye = torch.eye(r, dtype=torch.float64).expand(len(full_rank_rows), r, r)
        torch.testing.assert_close(full_rank_rows @ full_rank_rows.transpose(1, 2), eye, rtol=0, atol=1e-10)
        torch.testing.assert_close(q.left.norm(dim=1), s[..., :r], rtol=0, atol=1e-10 * float(s.max()))


def test_queries_truncated_batch_by_batch_equal_truncated_after(monkeypatch):
    """query_gradients(..., factors, query_rank=r) truncates each batch's preconditioned queries as they come: the
    same rank-r queries (hence scores) as compress_queries on the full-rank result, while every part it joins is
    already factored; without factors the rank is refused."""
    import influence_core.scores as scores_module

    model, task = gpt_neox(), CausalLMTask()
    layers = track_layers(model)
    factors = fit_factors(model, layers, task, token_batches(8), FactorArguments(dtype="float64", progress=False))
    after = compress_queries(query_gradients(model, layers, task, query_batches(n=5, batch_size=2), progress=False,
                                             factors=factors), rank=3)
    joined, join = [], scores_module._joined
    monkeypatch.setattr(scores_module, "_joined",
                        lambda parts, positions: joined.append(parts) or join(parts, positions))
    batchwise = query_gradients(model, layers, task, query_batches(n=5, batch_size=2), progress=False, factors=factors,
                                query_rank=3)
    assert len(joined) == len(layers) and all(len(parts) == 3 for parts in joined)  # 3 batches of <= 2 queries
    assert all(isinstance(p, LowRankQuery) for parts in joined for p in parts)
    assert batchwise.layer_fingerprints
    for name, query in after.items():
        assert isinstance(batchwise[name], LowRankQuery) and batchwise[name].shape == query.shape
        torch.testing.assert_close(batchwise[name].dense(), query.dense())
    expected = compute_scores(model, layers, task, token_batches(9), after, args=ScoreArguments(progress=False))
    got = compute_scores(model, layers, task, token_batches(9), batchwise,
                         args=ScoreArguments(progress=False, query_rank=3))
    torch.testing.assert_close(got.total, expected.total)
    with pytest.raises(ValueError, match="query_rank truncates the preconditioned queries"):
        query_gradients(model, layers, task, query_batches(n=2), progress=False, query_rank=3)
