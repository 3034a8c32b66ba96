"""GNH-vector products, conjugate gradient and LiSSA against the dense Gauss-Newton Hessian of tiny models."""

from __future__ import annotations

import pytest
import torch

from engine_models import ClassificationTask, classification_batches, gpt2, gpt_neox, mlp_classifier, token_batches
from influence_core import CausalLMTask, track_layers
from influence_core.reference.baselines import exact_gauss_newton, exact_ihvp
from influence_core.reference.gnh import (conjugate_gradient, flat_to_parameters, gnh_vector_product, layer_damping_vector,
                                num_tracked_parameters, parameters_to_flat, top_eigenvalue, tracked_parameters)
from influence_core.reference.lissa import LissaArguments, lissa_ihvp


def _concat(batches):
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


@pytest.mark.parametrize("make_model", [gpt_neox, gpt2], ids=["gpt_neox", "gpt2_conv1d"])
def test_gnh_vector_product_equals_dense_matrix(make_model):
    model = make_model()
    layers = track_layers(model)
    task = CausalLMTask()
    batches = token_batches(6, seed=3)  # the first sequence is padded
    gnh = exact_gauss_newton(model, layers, task, batches)
    v = torch.randn(3, gnh.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(gnh_vector_product(model, layers, task, batches, v), v @ gnh)
    torch.testing.assert_close(gnh_vector_product(model, layers, task, batches, v[0]), gnh @ v[0])


def test_flat_layout_round_trip():
    model = gpt2()
    layers = track_layers(model)
    params = [p.detach() for p in tracked_parameters(layers)]
    flat = parameters_to_flat(layers, params)
    assert flat.shape == (num_tracked_parameters(layers),)
    for a, b in zip(flat_to_parameters(layers, flat), params):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="canonical flat layout"):
        flat_to_parameters(layers, flat[:-1])


def test_conjugate_gradient_equals_exact_ihvp():
    model = gpt_neox()
    layers = track_layers(model)
    task = CausalLMTask()
    batches = token_batches(6, seed=3)
    gnh = exact_gauss_newton(model, layers, task, batches)
    damping = layer_damping_vector(layers, {l.name: 0.01 * (i + 1) for i, l in enumerate(layers)})
    rhs = torch.randn(2, gnh.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x, info = conjugate_gradient(lambda v: gnh_vector_product(model, layers, task, batches, v), rhs, damping,
                                 tolerance=1e-10, max_iterations=2000)
    torch.testing.assert_close(x, exact_ihvp(gnh, rhs, damping), rtol=1e-6, atol=1e-8)
    assert max(info["relative_residual"]) < 1e-10
    assert top_eigenvalue(lambda v: v @ gnh, gnh.shape[0], iterations=200) == pytest.approx(
        float(torch.linalg.eigvalsh(gnh)[-1]), rel=1e-3)


def test_preconditioned_conjugate_gradient_equals_exact_ihvp():
    """A preconditioner changes the path, not the solution: a poor one (Jacobi) still reaches the dense solve, the
    exact inverse reaches it in one step."""
    model = gpt_neox()
    layers = track_layers(model)
    task = CausalLMTask()
    batches = token_batches(6, seed=3)
    gnh = exact_gauss_newton(model, layers, task, batches)
    damping = layer_damping_vector(layers, {l.name: 1e-3 * (i + 1) for i, l in enumerate(layers)})
    rhs = torch.randn(2, gnh.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = exact_ihvp(gnh, rhs, damping)
    jacobi = 1.0 / (torch.diagonal(gnh) + damping)
    x, info = conjugate_gradient(lambda v: v @ gnh, rhs, damping, tolerance=1e-9, max_iterations=3000,
                                 preconditioner=lambda v: v * jacobi)
    torch.testing.assert_close(x, exact, rtol=1e-6, atol=1e-5)
    assert info["preconditioned"] and max(info["relative_residual"]) < 1e-9
    inverse = torch.linalg.inv(gnh + torch.diag(damping))
    x, info = conjugate_gradient(lambda v: v @ gnh, rhs, damping, tolerance=1e-9, max_iterations=3000,
                                 preconditioner=lambda v: v @ inverse)
    torch.testing.assert_close(x, exact, rtol=1e-6, atol=1e-5)
    assert info["iterations"] <= 2, info


def test_lissa_converges_to_exact_ihvp():
    """Full-batch LiSSA (batch = all data) with enough depth is the Neumann series: it equals the dense solve."""
    model = mlp_classifier()
    layers = track_layers(model, ["*"])
    task = ClassificationTask()
    batches = classification_batches(16)
    data = _concat(batches)
    gnh = exact_gauss_newton(model, layers, task, batches)
    damping = 0.1
    q = torch.randn(2, gnh.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = exact_ihvp(gnh, q, damping)
    scale = 1.1 * (float(torch.linalg.eigvalsh(gnh)[-1]) + damping)
    result = lissa_ihvp(model, layers, task, data, q, damping,
                        LissaArguments(depth=600, scale=scale, batch_size=16, snapshots=[10], progress=False))
    torch.testing.assert_close(result.ihvp, exact, rtol=1e-5, atol=1e-6)
    # an early snapshot is further away than the final estimate
    assert (result.snapshots[10] - exact).norm() > 10 * (result.ihvp - exact).norm()

    # stochastic mini-batches and repeats: close, not exact
    noisy = lissa_ihvp(model, layers, task, data, q, damping,
                       LissaArguments(depth=400, batch_size=8, repeats=2, progress=False))
    cosine = torch.nn.functional.cosine_similarity(noisy.ihvp, exact, dim=1)
    assert bool((cosine > 0.9).all()), cosine


def test_lissa_rejects_bad_input():
    model = mlp_classifier()
    layers = track_layers(model, ["*"])
    data = _concat(classification_batches(8))
    q = torch.zeros(1, num_tracked_parameters(layers), dtype=torch.float64)
    with pytest.raises(ValueError, match="batch_size"):
        lissa_ihvp(model, layers, ClassificationTask(), data, q, 0.1, LissaArguments(batch_size=100, progress=False))
    with pytest.raises(ValueError, match="depth"):
        LissaArguments(depth=0)
    with pytest.raises(ValueError, match="canonical flat layout"):
        lissa_ihvp(model, layers, ClassificationTask(), data, q[:, :-1], 0.1, LissaArguments(progress=False))
    with pytest.raises(FloatingPointError, match="raise scale"):
        lissa_ihvp(model, layers, ClassificationTask(), data, torch.ones_like(q), 0.1,
                   LissaArguments(depth=400, scale=1e-3, batch_size=8, progress=False))
