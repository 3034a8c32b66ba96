"""The PBRF solved by optimisation agrees with the exact damped Gauss-Newton influence (its linearisation)."""

from __future__ import annotations

import pytest
import torch

from engine_models import ClassificationTask, classification_batches, gpt_neox, mlp_classifier, query_batches, token_batches
from influence_core import CausalLMTask, track_layers
from influence_core.reference.baselines import exact_gauss_newton, exact_ihvp, parameter_gradients
from influence_core.reference.gnh import layer_damping_vector
from influence_core.reference.pbrf import PBRFArguments, pbrf_influence


def _rows(batches):
    return [{k: v[i : i + 1] for k, v in b.items()} for b in batches for i in range(len(next(iter(b.values()))))]


def _mlp_problem(data_batch_size: int, layer_damping: tuple[float, float]):
    """The tiny MLP classifier, its curvature data, 3 training points, 2 queries, per-layer damping, the dense
    GNH and the gradients q (queries) and r (training points)."""
    model = mlp_classifier(seed=3)
    layers = track_layers(model, ["*"])
    task = ClassificationTask()
    data = classification_batches(24, seed=4, batch_size=data_batch_size)
    examples = _rows(classification_batches(3, seed=5))
    queries = classification_batches(2, seed=6, batch_size=2)
    damping = layer_damping_vector(layers, dict(zip([l.name for l in layers], layer_damping)))
    gnh = exact_gauss_newton(model, layers, task, data)
    q = parameter_gradients(model, layers, task, queries, loss="query")
    r = parameter_gradients(model, layers, task, examples)
    return model, layers, task, data, examples, queries, damping, gnh, q, r


def test_pbrf_equals_exact_damped_gnh_influence_mlp():
    model, layers, task, data, examples, queries, damping, gnh, q, r = _mlp_problem(8, (0.02, 0.05))
    exact = exact_ihvp(gnh, q, damping) @ r.T  # engine convention: q^T (G + lambda)^{-1} r, q = grad(-f)
    before = [p.detach().clone() for p in model.parameters()]
    # the central difference leaves an O(eps^2) term: max error 0.19 at eps=1e-2, 1.9e-3 at 1e-3, 4.5e-5 at 1e-4
    result = pbrf_influence(model, layers, task, data, examples, queries, damping,
                            PBRFArguments(epsilon=1e-4, gradient_tolerance=1e-6, progress=False))
    assert bool(result.converged.all()), result.relative_gradient_norms
    torch.testing.assert_close(result.influence, exact, rtol=1e-4, atol=1e-4)
    assert bool((torch.sign(result.influence) == torch.sign(exact)).all())
    for a, b in zip(before, model.parameters()):  # weights restored
        assert torch.equal(a, b)
    # a larger epsilon is genuinely nonlinear: the forward difference moves away, the central one much less
    forward = pbrf_influence(model, layers, task, data, examples, queries, damping,
                             PBRFArguments(epsilon=0.02, central=False, gradient_tolerance=1e-6, progress=False))
    central = pbrf_influence(model, layers, task, data, examples, queries, damping,
                             PBRFArguments(epsilon=0.02, gradient_tolerance=1e-6, progress=False))
    assert bool(forward.converged.all()) and bool(central.converged.all())
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
                           PBRFArguments(epsilon=1e-4, gradient_tolerance=1e-6, max_iterations=500, progress=False))
    assert bool(lbfgs.converged.all()), lbfgs.relative_gradient_norms
    torch.testing.assert_close(lbfgs.influence, exact, rtol=1e-3, atol=1e-4)


def test_preconditioned_pbrf_converges_in_few_evaluations_and_reports_its_gradients():
    """With C = (G + lambda)^{-1/2} the solve is well conditioned: a handful of evaluations, the same PBRF; an
    unpreconditioned solve cut short is reported as not converged, with its gradient."""
    model, layers, task, data, examples, queries, damping, gnh, q, r = _mlp_problem(24, (1e-3, 3e-3))
    inverse = torch.linalg.inv(gnh + torch.diag(damping))
    exact = q @ inverse @ r.T
    values, vectors = torch.linalg.eigh(gnh + torch.diag(damping))
    root = (vectors / values.sqrt()) @ vectors.T
    args = PBRFArguments(epsilon=1e-5, gradient_tolerance=1e-8, check_every=1, progress=False)
    result = pbrf_influence(model, layers, task, data, examples, queries, damping, args, preconditioner=lambda v: v @ root)
    # damping this small moves theta far per unit eps: the central difference's O(eps^2) term is ~1e-4 relative here
    torch.testing.assert_close(result.influence, exact, rtol=1e-3, atol=1e-4)
    assert bool(result.converged.all()) and bool(result.example_converged.all())
    assert int(result.iterations.max()) <= 10, result.iterations
    assert result.final_gradients.shape == (3, 2, gnh.shape[0])
    # the reported norms are those of the returned gradients, relative to grad J(0) = grad L(z_m)
    torch.testing.assert_close(result.gradient_norms, result.final_gradients.abs().amax(dim=-1))
    torch.testing.assert_close(result.relative_gradient_norms,
                               result.gradient_norms / r.abs().amax(dim=1, keepdim=True), rtol=1e-6, atol=0)
    # the first-order error estimate -q^T (G + lambda)^{-1} (g+ + g-) / 2 bounds the (tiny) remaining error
    estimate = -(q @ inverse @ result.final_gradients.sum(dim=1).T) / 2
    assert float(estimate.abs().max()) < 1e-6

    # given each query's sensitivity w_q = (G + lambda)^{-1} q_q, an unpreconditioned solve may stop once the influence
    # error it leaves, max_q |w_q . g|, is below influence_tolerance (here in nats: w unscaled)
    sensitivity = q @ inverse
    loose = pbrf_influence(model, layers, task, data, examples, queries, damping,
                           PBRFArguments(epsilon=1e-5, gradient_tolerance=1e-12, influence_tolerance=1e-3,
                                         check_every=1, progress=False), error_weights=sensitivity)
    assert bool(loose.converged.all()) and float(loose.estimated_errors.max()) <= 1e-3
    assert float(loose.relative_gradient_norms.max()) > 1e-12  # stopped by the influence error, not the gradient
    torch.testing.assert_close(loose.influence, exact, rtol=0, atol=2e-3)

    short = pbrf_influence(model, layers, task, data, examples[:1], queries, damping,
                           PBRFArguments(epsilon=1e-5, gradient_tolerance=1e-8, max_iterations=2, check_every=1,
                                         progress=False))
    assert not bool(short.converged.any())
    assert float(short.relative_gradient_norms.min()) > 1e-8


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
    with pytest.raises(ValueError, match="influence_tolerance"):
        PBRFArguments(influence_tolerance=0)
    model = mlp_classifier()
    layers = track_layers(model, ["*"])
    with pytest.raises(ValueError, match="non-empty"):
        pbrf_influence(model, layers, ClassificationTask(), [], [], [], 0.1)
