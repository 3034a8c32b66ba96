"""EK-FAC factors against brute-force loops and the exact Gauss-Newton Hessian."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from engine_models import (ClassificationTask, FixedLabelTask, classification_batches, gpt2, gpt_neox,
                           mlp_classifier, token_batches)
from influence_core import FactorArguments, fit_factors, track_layers
from influence_core.reference.baselines import exact_gauss_newton, parameter_gradients, unflatten_layers


def dense_layer_curvature(factors, name: str) -> torch.Tensor:
    """The layer's fitted curvature as an explicit (P_l, P_l) matrix in canonical row-major layout."""
    lf = factors.layers[name]
    q = torch.kron(lf.gradient_eigenvectors, lf.activation_eigenvectors)  # vec(Q_S X Q_A^T) = (Q_S kron Q_A) vec(X)
    return q @ torch.diag(lf.eigenvalues.flatten()) @ q.T


class PseudoLabelsAsTraining(FixedLabelTask):
    def training_loss(self, model, batch):
        return super().training_loss(model, {**batch, "labels": self.fixed_labels(batch)})


def brute_force_covariances(model, layers, batches):
    """A = mean over real tokens of a a^T, S = (1/N) sum over tokens of g g^T: explicit per-sequence, per-token loops."""
    task = FixedLabelTask()
    inputs, deltas = {}, {}

    def hook_for(name):
        def hook(module, args, output):
            inputs[name] = args[0].detach()
            deltas[name] = torch.zeros_like(output, requires_grad=True)
            return output + deltas[name]  # d loss / d delta = d loss / d output
        return hook

    handles = [l.module.register_forward_hook(hook_for(l.name)) for l in layers]
    a_cov = {l.name: torch.zeros(l.input_dim, l.input_dim, dtype=torch.float64) for l in layers}
    s_cov = {l.name: torch.zeros(l.out_features, l.out_features, dtype=torch.float64) for l in layers}
    tokens = sequences = 0
    try:
        for batch in batches:
            for i in range(batch["input_ids"].shape[0]):
                one = {k: v[i : i + 1] for k, v in batch.items()}
                loss = task.pseudo_loss(model, one, None)
                grads = torch.autograd.grad(loss, [deltas[l.name] for l in layers])
                for layer, g in zip(layers, grads):
                    for t in range(one["input_ids"].shape[1]):
                        if one["attention_mask"][0, t]:
                            a = torch.cat([inputs[layer.name][0, t], torch.ones(1, dtype=torch.float64)])
                            a_cov[layer.name] += torch.outer(a, a)
                        s_cov[layer.name] += torch.outer(g[0, t], g[0, t])
                tokens += int(one["attention_mask"].sum())
                sequences += 1
    finally:
        for h in handles:
            h.remove()
    return {n: m / tokens for n, m in a_cov.items()}, {n: m / sequences for n, m in s_cov.items()}


@pytest.mark.parametrize("make_model", [gpt_neox, gpt2], ids=["gpt_neox", "gpt2_conv1d"])
def test_ekfac_factors_equal_brute_force(make_model, tmp_path):
    model = make_model()
    layers = track_layers(model)
    batches = token_batches(10)
    factors = fit_factors(model, layers, FixedLabelTask(), batches, FactorArguments(dtype="float64", progress=False),
                          output_dir=tmp_path)
    covariance = load_file(tmp_path / "covariance.safetensors")
    a_cov, s_cov = brute_force_covariances(model, layers, batches)
    for layer in layers:
        torch.testing.assert_close(covariance[f"{layer.name}.activation_covariance"], a_cov[layer.name])
        torch.testing.assert_close(covariance[f"{layer.name}.gradient_covariance"], s_cov[layer.name])

    # Eigenvalue correction: per-sequence gradients from plain autograd, rotated into the engine's eigenbasis.
    per_sequence = unflatten_layers(layers, parameter_gradients(model, layers, PseudoLabelsAsTraining(), batches))
    for layer in layers:
        lf = factors.layers[layer.name]
        rotated = lf.gradient_eigenvectors.T @ per_sequence[layer.name] @ lf.activation_eigenvectors
        torch.testing.assert_close(lf.eigenvalues, rotated.square().mean(dim=0))


def test_exact_gauss_newton_matches_jacobian():
    """G = (1/N) sum_n J_n^T (diag p - p p^T) J_n with J from torch.autograd.functional.jacobian."""
    model = mlp_classifier()
    layers = track_layers(model, ["0", "2"])
    batches = classification_batches(6)
    gnh = exact_gauss_newton(model, layers, ClassificationTask(), batches)

    params = [model[0].weight, model[0].bias, model[2].weight, model[2].bias]
    shapes = [p.shape for p in params]
    expected = torch.zeros_like(gnh)
    for batch in batches:
        for x in batch["x"]:
            def logits_of(*flat_params):
                h = torch.tanh(flat_params[0] @ x + flat_params[1])
                return flat_params[2] @ h + flat_params[3]
            jac = torch.autograd.functional.jacobian(logits_of, tuple(p.detach() for p in params))
            # canonical layout per layer: [W | b] row-major
            j0 = torch.cat([jac[0], jac[1].unsqueeze(-1)], dim=-1).reshape(len(jac[0]), -1)
            j1 = torch.cat([jac[2], jac[3].unsqueeze(-1)], dim=-1).reshape(len(jac[2]), -1)
            j = torch.cat([j0, j1], dim=1)
            p = torch.softmax(logits_of(*[q.detach() for q in params]), dim=0)
            expected += j.T @ (torch.diag(p) - torch.outer(p, p)) @ j
    assert shapes  # layers are Linear: canonical layout equals [W | b]
    torch.testing.assert_close(gnh, expected / 6)


@pytest.mark.parametrize("layer_name", ["0", "2"])
@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_single_example_ekfac_is_exact(layer_name, strategy):
    """One example, one token, one layer, expected Fisher: G_l = a a^T (x) E[g g^T] exactly, so K-FAC and EK-FAC
    equal the exact block, and so do their damped inverse-Hessian-vector products."""
    model = mlp_classifier()
    layers = track_layers(model, [layer_name])
    batches = classification_batches(1, batch_size=1)
    task = ClassificationTask()
    factors = fit_factors(model, layers, task, batches,
                          FactorArguments(strategy=strategy, fisher="expected", dtype="float64", progress=False))
    gnh = exact_gauss_newton(model, layers, task, batches)
    torch.testing.assert_close(dense_layer_curvature(factors, layers[0].name), gnh)

    damping = factors.damping_for(layers[0].name)
    v = torch.randn(3, layers[0].out_features, layers[0].input_dim, dtype=torch.float64)
    expected = torch.linalg.solve(gnh + damping * torch.eye(len(gnh), dtype=torch.float64), v.reshape(3, -1).T).T
    torch.testing.assert_close(factors.precondition(layers[0].name, v).reshape(3, -1), expected)


def test_expected_fisher_matches_sampled_on_average():
    """Sampled-label covariances converge to the expected-Fisher ones (Monte Carlo, many repeats of the data)."""
    model = mlp_classifier()
    layers = track_layers(model, ["2"])
    task = ClassificationTask()
    expected = fit_factors(model, layers, task, classification_batches(8),
                           FactorArguments(strategy="kfac", fisher="expected", dtype="float64", progress=False))
    sampled = fit_factors(model, layers, task, classification_batches(8) * 400,
                          FactorArguments(strategy="kfac", fisher="sampled", dtype="float64", progress=False))
    name = layers[0].name
    exact, estimate = dense_layer_curvature(expected, name), dense_layer_curvature(sampled, name)
    assert float((exact - estimate).norm() / exact.norm()) < 0.08


def test_expected_fisher_refuses_sequences():
    model = gpt_neox()
    with pytest.raises(ValueError, match="one predicted position"):
        fit_factors(model, track_layers(model), FixedLabelTask(), token_batches(4),
                    FactorArguments(fisher="expected", progress=False))


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown strategy"):
        FactorArguments(strategy="ekfca")
