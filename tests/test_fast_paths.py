"""The engine's shortcuts (issue 8's speed-ups) give the same numbers as the plain definitions they replace."""

from __future__ import annotations

import pytest
import torch

from engine_models import gpt2, gpt_neox, query_batches, token_batches
from influence_core import (CausalLMTask, FactorArguments, Factors, ScoreArguments, compute_scores, fit_factors,
                            iterate_batches, precondition_queries, query_gradients, track_layers)
from influence_core.factors import passes
from influence_core.task import IGNORE_INDEX, sampled_label_surrogate, trim_padding
from test_factors import FixedLabelTask, dense_layer_curvature

ARGS = dict(dtype="float64", progress=False)


@pytest.mark.parametrize("make_model", [gpt_neox, gpt2], ids=["gpt_neox", "gpt2_conv1d"])
def test_sampled_label_surrogate_has_the_pseudo_loss_gradient(make_model):
    """sum_t (p_t - e_{y_t})^T logits_t has the gradient of sum_t CE(logits_t, y_t), with the same draws y_t."""
    model = make_model()
    task = CausalLMTask()
    batch = token_batches(4, length=7)[0]  # the first row is right-padded: its last labels are ignored
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(task.pseudo_loss(model, batch, torch.Generator().manual_seed(7)), params)
    logits, labels = task.forward(model, batch)
    surrogate = sampled_label_surrogate(logits, labels, torch.Generator().manual_seed(7))
    for got, want in zip(torch.autograd.grad(surrogate, params), expected):
        torch.testing.assert_close(got, want)
    # a different draw gives a different gradient: the test would notice labels that ignore the generator
    other = sampled_label_surrogate(*task.forward(model, batch), torch.Generator().manual_seed(8))
    assert not torch.allclose(torch.autograd.grad(other, params)[0], expected[0])


@pytest.mark.parametrize("make_model", [gpt_neox, gpt2], ids=["gpt_neox", "gpt2_conv1d"])
def test_eigenvalue_correction_is_the_same_in_either_rotation_order(make_model, monkeypatch):
    """Q_S^T (sum_t g_t a_t^T) Q_A = sum_t (Q_S^T g_t)(Q_A^T a_t)^T: the cost-based choice changes no eigenvalue."""
    model = make_model()
    layers = track_layers(model)
    fitted = {}
    for tokens_first in (True, False):
        monkeypatch.setattr(passes, "rotate_tokens_first", lambda *shape, choice=tokens_first: choice)
        fitted[tokens_first] = fit_factors(model, layers, FixedLabelTask(), token_batches(10), FactorArguments(**ARGS))
    for layer in layers:
        torch.testing.assert_close(fitted[True].layers[layer.name].eigenvalues,
                                   fitted[False].layers[layer.name].eigenvalues, rtol=1e-10, atol=1e-14)


def padded_columns(batches, extra: int):
    """The same batches with `extra` all-padding columns appended (every row right-padded further)."""
    out = []
    for batch in batches:
        rows = batch["input_ids"].shape[0]
        out.append({"input_ids": torch.cat([batch["input_ids"], torch.zeros(rows, extra, dtype=torch.long)], 1),
                    "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(rows, extra, dtype=torch.long)], 1),
                    "labels": torch.cat([batch["labels"], torch.full((rows, extra), IGNORE_INDEX)], 1)})
    return out


def test_trim_padding_drops_only_columns_that_every_row_pads():
    ids = torch.arange(12).reshape(2, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    trimmed, dropped = trim_padding({"input_ids": ids, "attention_mask": mask, "labels": ids, "note": "kept"})
    assert dropped == 2
    assert trimmed["input_ids"].shape == (2, 4) and trimmed["attention_mask"].shape == (2, 4)
    assert torch.equal(trimmed["labels"], ids[:, :4]) and trimmed["note"] == "kept"
    left_padded = {"input_ids": ids, "attention_mask": mask.flip(1)}
    unchanged, dropped = trim_padding(left_padded)
    assert unchanged is left_padded and dropped == 0  # no trailing column is padding in every row


def test_trimmed_padding_columns_change_no_factor(monkeypatch):
    """A fit on batches padded 5 columns wider, which trim_padding narrows, equals the untrimmed fit: same
    covariances and eigenvalues, sampled labels included (the dropped columns' uniforms are drawn and discarded)."""
    model = gpt_neox()
    layers = track_layers(model)
    fit = padded_columns(token_batches(8, seed=4), 5)
    trimmed = fit_factors(model, layers, CausalLMTask(), fit, FactorArguments(**ARGS))
    monkeypatch.setattr(passes, "trim_padding", lambda batch: (batch, 0))
    untrimmed = fit_factors(model, layers, CausalLMTask(), fit, FactorArguments(**ARGS))
    for layer in layers:
        torch.testing.assert_close(trimmed.layers[layer.name].eigenvalues, untrimmed.layers[layer.name].eigenvalues)
        torch.testing.assert_close(dense_layer_curvature(trimmed, layer.name), dense_layer_curvature(untrimmed, layer.name))
    # the guard: without discarding the dropped columns' uniforms the labels, and so the eigenvalues, differ
    monkeypatch.setattr(passes, "trim_padding", lambda batch: (trim_padding(batch)[0], 0))
    narrow_draws = fit_factors(model, layers, CausalLMTask(), fit, FactorArguments(**ARGS))
    assert not torch.allclose(narrow_draws.layers[layers[0].name].eigenvalues, trimmed.layers[layers[0].name].eigenvalues)


def test_trailing_padding_columns_change_no_score():
    """Scoring batches padded 5 columns wider (queries 3) gives the same scores; token-wise scores keep the padded
    width, with zeros on the padding."""
    model = gpt_neox()
    layers = track_layers(model)
    task = CausalLMTask()
    factors = fit_factors(model, layers, task, token_batches(8, seed=4), FactorArguments(**ARGS))

    def run(train, queries):
        q = precondition_queries(query_gradients(model, layers, task, queries, progress=False), factors)
        return compute_scores(model, layers, task, train, q, args=ScoreArguments(per_token=True, progress=False))

    train, queries = token_batches(6), query_batches()
    plain = run(train, queries)
    padded = run(padded_columns(train, 5), padded_columns(queries, 3))
    torch.testing.assert_close(padded.total, plain.total)
    torch.testing.assert_close(padded.per_layer, plain.per_layer)
    width = plain.per_token.shape[-1]
    assert padded.per_token.shape[-1] == width + 5
    torch.testing.assert_close(padded.per_token[..., :width], plain.per_token)
    assert bool((padded.per_token[..., width:] == 0).all())


def test_query_gradients_preconditioned_batch_by_batch_equal_preconditioning_after():
    """query_gradients(..., factors=f) = precondition_queries(query_gradients(...), f), over several query batches."""
    model = gpt2()
    layers = track_layers(model)
    task = CausalLMTask()
    factors = fit_factors(model, layers, task, token_batches(8, seed=4), FactorArguments(**ARGS))
    queries = query_batches(n=5)
    split = iterate_batches(queries[0], 2)  # 3 batches: 2 + 2 + 1 queries
    after = precondition_queries(query_gradients(model, layers, task, split, progress=False), factors)
    during = query_gradients(model, layers, task, split, progress=False, factors=factors)
    assert list(during) == list(after)
    for name in after:
        assert during[name].shape[0] == 5
        torch.testing.assert_close(during[name], after[name])
    partial = Factors(factors.strategy, {n: f for n, f in factors.layers.items() if n != layers[0].name})
    with pytest.raises(ValueError, match="no factors for layers"):
        query_gradients(model, layers, task, split, progress=False, factors=partial)


@pytest.mark.parametrize("blocks", [None, 2], ids=["whole_S", "block_diagonal_S"])
@pytest.mark.parametrize("tokens_first", [True, False])
@pytest.mark.parametrize("rank", [None, 3])
def test_query_preconditioning_from_tokens_equals_form_precondition_truncate(blocks, tokens_first, rank, monkeypatch):
    """EigenbasisFactors.precondition_query (tokens rotated first or D_n rotated; rank-r truncation in the eigenbasis,
    factors rotated back) gives the numbers of forming D_n, preconditioning it and truncating the result."""
    from influence_core.factors import types
    from influence_core.factors.types import LayerFactors
    from influence_core.lowrank import LowRankQuery
    from influence_core.tracking import LayerCapture

    model = gpt_neox()
    layers = track_layers(model)
    task = CausalLMTask()
    factors = fit_factors(model, layers, task, token_batches(12, seed=5),
                          FactorArguments(strategy="ekfac", output_blocks=blocks, **ARGS))
    batch = query_batches(n=4, length=7)[0]
    with LayerCapture(layers) as capture:
        capture.clear(batch)
        grads = capture.output_gradients(task.query_loss(model, batch))
        captured = [(l.name, capture.activations[l.name].double(), grads[l.name].double()) for l in layers]
    monkeypatch.setattr(types, "rotate_tokens_first", lambda *shape: tokens_first)
    for name, a, g in captured:
        layer, damping = factors.layers[name], factors.damping_for(name)
        got = layer.precondition_query(a, g, damping, rank)
        want = LayerFactors.precondition_query(layer, a, g, damping, rank)  # the base: form, precondition, truncate
        assert isinstance(got, LowRankQuery) == (rank is not None)
        if rank is not None:
            assert got.left.shape == want.left.shape and got.right.shape == want.right.shape
            got, want = got.dense(), want.dense()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
