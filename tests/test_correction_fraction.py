"""Correction subset (FactorArguments.correction_fraction = f): A and S from all fitting batches, the eigenvalue
correction from the first ceil(f x batches) only (issue 19's "other split"); with a token cache, only those batches'
tokens are kept."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import influence_core.factors.passes as passes
from engine_models import FixedLabelTask, gpt_neox, token_batches
from influence_core import CausalLMTask, FactorArguments, fit_factors, track_layers
from influence_core.factors.types import FactorMismatchError
from influence_core.reference.baselines import parameter_gradients, unflatten_layers
from test_factors import PseudoLabelsAsTraining, brute_force_covariances

ARGS = dict(dtype="float64", progress=False)
BIG = 2**30


def test_covariances_from_all_batches_correction_from_the_first(tmp_path, monkeypatch):
    """f = 0.3 of 4 batches of 4: A and S over all 16 sequences, by brute force; Lambda the mean over the first
    ceil(1.2) = 2 batches (8 sequences) of the squared per-sequence gradients in that eigenbasis."""
    model = gpt_neox()
    layers = track_layers(model)
    batches = token_batches(16, batch_size=4)
    real, calls = passes.pseudo_gradients, []
    monkeypatch.setattr(passes, "pseudo_gradients", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    factors = fit_factors(model, layers, FixedLabelTask(), batches,
                          FactorArguments(correction_fraction=0.3, **ARGS), output_dir=tmp_path)
    assert len(calls) == 4 + 2  # the covariance pass reads all four batches, the correction two
    covariance = load_file(tmp_path / "covariance.safetensors")
    assert float(covariance["num_sequences"]) == 16
    a_all, s_all = brute_force_covariances(model, layers, batches)
    per_sequence = unflatten_layers(layers, parameter_gradients(model, layers, PseudoLabelsAsTraining(), batches[:2]))
    for layer in layers:
        torch.testing.assert_close(covariance[f"{layer.name}.activation_covariance"], a_all[layer.name])
        torch.testing.assert_close(covariance[f"{layer.name}.gradient_covariance"], s_all[layer.name])
        lf = factors.layers[layer.name]
        rotated = lf.gradient_eigenvectors.T @ per_sequence[layer.name] @ lf.activation_eigenvectors
        assert rotated.shape[0] == 8
        torch.testing.assert_close(lf.eigenvalues, rotated.square().mean(dim=0))


@pytest.mark.parametrize("fraction", [0.3, 1.0])
def test_one_pass_with_a_correction_fraction_keeps_only_those_batches(fraction):
    """The one-pass fit keeps the first ceil(f x 4) batches' tokens and equals the two-pass fit whose correction
    reads those batches with the covariance pass's labels."""
    model = gpt_neox()
    layers = track_layers(model)
    batches = token_batches(16, batch_size=4)
    args = FactorArguments(correction_fraction=fraction, **ARGS)
    cov = passes.covariance_pass(model, layers, CausalLMTask(), batches, args)
    eig = passes.eigendecomposition(cov, [l.name for l in layers], args)
    reference = passes.correction_pass(model, layers, CausalLMTask(), batches, args, eig, label_pass=0)
    kept = []
    real_add = passes.TokenCache.add
    try:
        passes.TokenCache.add = lambda self, k, n: (kept.append(n), real_add(self, k, n))[1]
        one_pass = fit_factors(model, layers, CausalLMTask(), batches,
                               FactorArguments(correction_fraction=fraction, token_cache_bytes=BIG, **ARGS))
    finally:
        passes.TokenCache.add = real_add
    assert kept == [4] * (2 if fraction == 0.3 else 4)
    for layer in layers:
        torch.testing.assert_close(one_pass.layers[layer.name].eigenvalues, reference[f"{layer.name}.eigenvalues"],
                                   rtol=1e-10, atol=1e-14)


def test_the_budget_counts_only_the_batches_kept():
    model = gpt_neox()
    layers = track_layers(model)
    batches = token_batches(16, batch_size=4)
    per_batch = 4 * batches[0]["input_ids"].shape[1] * sum(l.input_dim + l.out_features for l in layers) * 8
    fit_factors(model, layers, CausalLMTask(), batches,
                FactorArguments(correction_fraction=0.25, token_cache_bytes=per_batch, **ARGS))
    with pytest.raises(ValueError, match=r"too small: .* of 2 batches of 4 x"):
        fit_factors(model, layers, CausalLMTask(), batches,
                    FactorArguments(correction_fraction=0.5, token_cache_bytes=per_batch, **ARGS))


@pytest.mark.parametrize("value", [0, -0.5, 1.5, float("nan"), "0.5", True])
def test_bad_fractions_are_refused_with_the_fix(value):
    with pytest.raises(ValueError, match=r"correction_fraction=.*give a number in \(0, 1\]"):
        FactorArguments(correction_fraction=value)


@pytest.mark.parametrize("strategy", ["kfac", "diagonal", "identity"])
def test_strategies_other_than_ekfac_refuse_a_correction_fraction(strategy):
    with pytest.raises(ValueError, match=f"strategy .{strategy}. has none to subset: use ekfac"):
        FactorArguments(strategy=strategy, correction_fraction=0.5)


def test_a_directory_fitted_with_another_correction_fraction_is_refused(tmp_path):
    model = gpt_neox()
    layers = track_layers(model)
    fit_factors(model, layers, CausalLMTask(), token_batches(8), FactorArguments(correction_fraction=0.5, **ARGS),
                output_dir=tmp_path)
    for other in (None, 0.25):
        with pytest.raises(FactorMismatchError, match="correction_fraction=0.5"):
            fit_factors(model, layers, CausalLMTask(), token_batches(8),
                        FactorArguments(correction_fraction=other, **ARGS), output_dir=tmp_path)


def test_the_influence_config_passes_the_fraction_and_keys_the_cache():
    from pathlib import Path

    from omegaconf import OmegaConf

    from experiments.pipeline import cache_key, check_influence_settings, factor_arguments, numerical_settings

    config = OmegaConf.load(Path(__file__).parents[1] / "configs" / "influence" / "ekfac.yaml")
    assert config.correction_fraction is None and factor_arguments(config).correction_fraction is None
    before = OmegaConf.create({k: v for k, v in config.items() if k != "correction_fraction"})
    assert cache_key(numerical_settings(config)) == cache_key(numerical_settings(before))
    subset = OmegaConf.merge(config, {"correction_fraction": 0.1})
    check_influence_settings(subset)
    assert factor_arguments(subset).correction_fraction == 0.1
    assert cache_key(numerical_settings(subset)) != cache_key(numerical_settings(config))
    with pytest.raises(ValueError, match=r"influence.correction_fraction=2: give a number in \(0, 1\]"):
        check_influence_settings(OmegaConf.merge(config, {"correction_fraction": 2}))
