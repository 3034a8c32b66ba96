"""Output blocks: S block-diagonal over k blocks of output rows (FactorArguments.output_blocks), and the scoring
contraction split into the same blocks (ScoreArguments.output_blocks)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from engine_models import FixedLabelTask, gpt_neox, query_batches, token_batches
from influence_core import (CausalLMTask, FactorArguments, ScoreArguments, compute_scores, fit_factors,
                            precondition_queries, query_gradients, track_layers)
from influence_core.reference.baselines import parameter_gradients, unflatten_layers
from test_factors import PseudoLabelsAsTraining, brute_force_covariances

ARGS = dict(dtype="float64", progress=False)


def scores_of(model, layers, factors, per_token=False, output_blocks=None):
    task = CausalLMTask()
    q = precondition_queries(query_gradients(model, layers, task, query_batches(), progress=False), factors)
    return compute_scores(model, layers, task, token_batches(10), q,
                          args=ScoreArguments(per_token=per_token, progress=False, output_blocks=output_blocks))


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_one_output_block_equals_the_whole_gradient_covariance(strategy):
    model = gpt_neox()
    layers = track_layers(model)
    whole = fit_factors(model, layers, CausalLMTask(), token_batches(10), FactorArguments(strategy=strategy, **ARGS))
    one = fit_factors(model, layers, CausalLMTask(), token_batches(10),
                      FactorArguments(strategy=strategy, output_blocks=1, **ARGS))
    for layer in layers:
        assert one.layers[layer.name].gradient_eigenvectors.shape == (1, layer.out_features, layer.out_features)
        torch.testing.assert_close(one.layers[layer.name].eigenvalues, whole.layers[layer.name].eigenvalues,
                                   rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(scores_of(model, layers, one).total, scores_of(model, layers, whole).total,
                               rtol=1e-10, atol=1e-12)


def test_blocks_are_the_diagonal_blocks_of_S(tmp_path):
    model = gpt_neox()
    layers = track_layers(model)
    fit_factors(model, layers, FixedLabelTask(), token_batches(10), FactorArguments(output_blocks=2, **ARGS),
                output_dir=tmp_path)
    saved = load_file(tmp_path / "covariance.safetensors")
    _, s_cov = brute_force_covariances(model, layers, token_batches(10))
    for layer in layers:
        b = layer.out_features // 2
        blocks = saved[f"{layer.name}.gradient_covariance"]  # (2, b, b)
        torch.testing.assert_close(blocks[0], s_cov[layer.name][:b, :b])
        torch.testing.assert_close(blocks[1], s_cov[layer.name][b:, b:])


def test_d_out_blocks_are_the_diagonal_in_S_limit_by_hand():
    """k = d_out: every block is 1 x 1, so Q_S = I and, with D_n the per-sequence gradient and Q_A the eigenvectors
    of A, EK-FAC's Lambda = (1/N) sum_n (D_n Q_A)^2, K-FAC's Lambda = diag(S) l_A^T, and the IHVP is
    ((V Q_A) / (Lambda + lambda)) Q_A^T."""
    model = gpt_neox()
    layers = track_layers(model, ["*dense_4h_to_h"])  # d_out = 8, d_in = 12 + 1
    layer, batches = layers[0], token_batches(10)
    d_out = layer.out_features
    ekfac = fit_factors(model, layers, FixedLabelTask(), batches, FactorArguments(output_blocks=d_out, **ARGS))
    kfac = fit_factors(model, layers, FixedLabelTask(), batches,
                       FactorArguments(strategy="kfac", output_blocks=d_out, **ARGS))
    lf = ekfac.layers[layer.name]
    torch.testing.assert_close(lf.gradient_eigenvectors, torch.ones(d_out, 1, 1, dtype=torch.float64))

    a_cov, s_cov = brute_force_covariances(model, layers, batches)
    l_a, q_a = torch.linalg.eigh(a_cov[layer.name])
    torch.testing.assert_close(lf.activation_eigenvectors.abs(), q_a.abs())  # eigenvectors up to sign
    per_sequence = unflatten_layers(layers, parameter_gradients(model, layers, PseudoLabelsAsTraining(), batches))
    by_hand = (per_sequence[layer.name] @ lf.activation_eigenvectors).square().mean(dim=0)
    torch.testing.assert_close(lf.eigenvalues, by_hand)
    torch.testing.assert_close(kfac.layers[layer.name].eigenvalues, torch.outer(s_cov[layer.name].diagonal(), l_a))

    v = torch.randn(3, d_out, layer.input_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    damping = ekfac.damping_for(layer.name)
    expected = ((v @ lf.activation_eigenvectors) / (by_hand + damping)) @ lf.activation_eigenvectors.T
    torch.testing.assert_close(ekfac.precondition(layer.name, v), expected)


def test_scores_split_in_output_blocks_are_the_same_numbers():
    model = gpt_neox()
    layers = track_layers(model)
    factors = fit_factors(model, layers, CausalLMTask(), token_batches(10), FactorArguments(**ARGS))
    whole = scores_of(model, layers, factors, per_token=True)
    split = scores_of(model, layers, factors, per_token=True, output_blocks=4)
    torch.testing.assert_close(split.total, whole.total)
    torch.testing.assert_close(split.per_token, whole.per_token)


def test_bad_output_blocks_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="output_blocks=2 splits the gradient covariance S, which strategy 'diagonal'"):
        FactorArguments(strategy="diagonal", output_blocks=2)
    with pytest.raises(ValueError, match="output_blocks must be >= 1"):
        FactorArguments(output_blocks=0)
    model = gpt_neox()
    with pytest.raises(ValueError, match=r"output_blocks=3 does not divide d_out=8 of layer .*choose a divisor"):
        fit_factors(model, track_layers(model), CausalLMTask(), token_batches(4), FactorArguments(output_blocks=3, **ARGS))
