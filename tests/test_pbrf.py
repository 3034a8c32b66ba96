"""The PBRF solved by optimisation agrees with the exact damped Gauss-Newton influence (its linearisation)."""

from __future__ import annotations

import pytest
import torch

from engine_models import ClassificationTask, classification_batches, gpt_neox, mlp_classifier, query_batches, token_batches
from influence_core import CausalLMTask, track_layers
from influence_core.baselines import exact_gauss_newton, exact_ihvp, parameter_gradients
from influence_core.gnh import layer_damping_vector
from influence_core.pbrf import PBRFArguments, pbrf_influence


def _rows(batches):
    return [{k: v[i : i + 1] for k, v in b.items()} for b in batches for i in range(len(next(iter(b.values()))))]


def test_pbrf_equals_exact_damped_gnh_influence_mlp():
    model = mlp_classifier(seed=3)
    layers = track_layers(model, ["*"])
    task = ClassificationTask()
    data = classification_batches(24, seed=4, batch_size=8)
    examples = _rows(classification_batches(3, seed=5))
    queries = classification_batches(2, seed=6, batch_size=2)
    damping = layer_damping_vector(layers, {layers[0].name: 0.02, layers[1].name: 0.05})
    gnh = exact_gauss_newton(model, layers, task, data)
    q = parameter_gradients(model, layers, task, queries, loss="query")
    r = parameter_gradients(model, layers, task, examples)
    exact = exact_ihvp(gnh, q, damping) @ r.T  # engine convention: q^T (G + lambda)^{-1} r, q = grad(-f)
    before = [p.detach().clone() for p in model.parameters()]
    # the central difference leaves an O(eps^2) term: max error 0.19 at eps=1e-2, 1.9e-3 at 1e-3, 4.5e-5 at 1e-4
    result = pbrf_influence(model, layers, task, data, examples, queries, damping,
                            PBRFArguments(epsilon=1e-4, gradient_tolerance=1e-10, progress=False))
    torch.testing.assert_close(result.influence, exact, rtol=1e-4, atol=1e-4)
    assert bool((torch.sign(result.influence) == torch.sign(exact)).all())
    for a, b in zip(before, model.parameters()):  # weights restored
        assert torch.equal(a, b)
    # a larger epsilon is genuinely nonlinear: the forward difference moves away, the central one much less
    forward = pbrf_influence(model, layers, task, data, examples, queries, damping,
                             PBRFArguments(epsilon=0.02, central=False, gradient_tolerance=1e-10, progress=False))
    central = pbrf_influence(model, layers, task, data, examples, queries, damping,
                             PBRFArguments(epsilon=0.02, gradient_tolerance=1e-10, progress=False))
    assert (central.influence - exact).abs().max() < (forward.influence - exact).abs().max()


def test_pbrf_equals_exact_on_a_transformer():
    model = gpt_neox(seed=2)
    layers = track_layers(model)
    task = CausalLMTask()
    data = token_batches(8, seed=7)
    examples = _rows(token_batches(1, seed=8, pad_last=False))
    queries = query_batches(n=2)
    damping = 0.01
    gnh = exact_gauss_newton(model, layers, task, data)
    q = parameter_gradients(model, layers, task, queries, loss="query")
    r = parameter_gradients(model, layers, task, examples)
    exact = exact_ihvp(gnh, q, damping) @ r.T
    lbfgs = pbrf_influence(model, layers, task, data, examples, queries, damping,
                           PBRFArguments(epsilon=1e-4, gradient_tolerance=1e-9, max_iterations=500, progress=False))
    torch.testing.assert_close(lbfgs.influence, exact, rtol=1e-3, atol=1e-4)


def test_pbrf_with_adam():
    """Adam (the paper's solver for the LM) gets close, not exact, in a fixed number of steps."""
    model = mlp_classifier(seed=3)
    layers = track_layers(model, ["*"])
    task = ClassificationTask()
    data = classification_batches(24, seed=4, batch_size=24)
    examples = _rows(classification_batches(1, seed=5))
    queries = classification_batches(2, seed=6, batch_size=2)
    gnh = exact_gauss_newton(model, layers, task, data)
    q = parameter_gradients(model, layers, task, queries, loss="query")
    r = parameter_gradients(model, layers, task, examples)
    exact = exact_ihvp(gnh, q, 0.05) @ r.T
    adam = pbrf_influence(model, layers, task, data, examples, queries, 0.05,
                          PBRFArguments(epsilon=1e-4, optimizer="adam", learning_rate=0.05, max_iterations=1500,
                                        progress=False))
    torch.testing.assert_close(adam.influence, exact, rtol=0.02, atol=0.02)


def test_pbrf_rejects_bad_input():
    with pytest.raises(ValueError, match="epsilon"):
        PBRFArguments(epsilon=0)
    with pytest.raises(ValueError, match="optimizer"):
        PBRFArguments(optimizer="sgd")
    model = mlp_classifier()
    layers = track_layers(model, ["*"])
    with pytest.raises(ValueError, match="non-empty"):
        pbrf_influence(model, layers, ClassificationTask(), [], [], [], 0.1)
