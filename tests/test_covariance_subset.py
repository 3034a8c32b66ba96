"""Covariance subset (FactorArguments.covariance_fraction = f): A and S from the first ceil(f x batches) fitting
batches, the eigenvalue correction from all of them; f = 1 is the default fit. The tests parametrized over SPLITS
cover the other split too (correction_fraction: tests/test_correction_fraction.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import influence_core.factors.passes as passes
from engine_models import FixedLabelTask, gpt_neox, token_batches
from influence_core import CausalLMTask, FactorArguments, fit_factors, track_layers
from influence_core.factors.passes import leading_batch_count
from influence_core.factors.types import FactorMismatchError
from influence_core.reference.baselines import parameter_gradients, unflatten_layers
from test_factors import PseudoLabelsAsTraining, brute_force_covariances

ARGS = dict(dtype="float64", progress=False)


def test_fraction_one_is_the_default_fit_exactly():
    model = gpt_neox()
    layers = track_layers(model)
    default = fit_factors(model, layers, CausalLMTask(), token_batches(10), FactorArguments(**ARGS))
    whole = fit_factors(model, layers, CausalLMTask(), token_batches(10), FactorArguments(covariance_fraction=1.0, **ARGS))
    for name, lf in default.layers.items():
        for key, value in lf.tensors().items():
            assert torch.equal(whole.layers[name].tensors()[key], value), (name, key)


@pytest.mark.parametrize("key", ["covariance_fraction", "correction_fraction"])
def test_one_pass_reads_the_first_batches_the_other_all(tmp_path, monkeypatch, key):
    """f = 0.3 of 4 batches of 4: the subset pass reads the first ceil(1.2) = 2 batches (8 sequences), the other all
    16 sequences. By brute force: A and S over the covariance pass's batches; Lambda the mean over the correction's
    sequences of the squared per-sequence gradients in that eigenbasis."""
    model = gpt_neox()
    layers = track_layers(model)
    batches = token_batches(16, batch_size=4)
    real, calls = passes.pseudo_gradients, []
    monkeypatch.setattr(passes, "pseudo_gradients", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    factors = fit_factors(model, layers, FixedLabelTask(), batches, FactorArguments(**{key: 0.3}, **ARGS),
                          output_dir=tmp_path)
    assert len(calls) == 2 + 4  # one pass reads two batches, the other all four
    covariance_batches, correction_batches = (batches[:2], batches) if key == "covariance_fraction" else (batches,
                                                                                                      batches[:2])
    covariance = load_file(tmp_path / "covariance.safetensors")
    assert float(covariance["num_sequences"]) == 4 * len(covariance_batches)
    a_pass, s_pass = brute_force_covariances(model, layers, covariance_batches)
    a_other, _ = brute_force_covariances(model, layers, correction_batches)
    per_sequence = unflatten_layers(layers, parameter_gradients(model, layers, PseudoLabelsAsTraining(),
                                                                correction_batches))
    assert next(iter(per_sequence.values())).shape[0] == 4 * len(correction_batches)
    for layer in layers:
        torch.testing.assert_close(covariance[f"{layer.name}.activation_covariance"], a_pass[layer.name])
        torch.testing.assert_close(covariance[f"{layer.name}.gradient_covariance"], s_pass[layer.name])
        assert not torch.allclose(a_pass[layer.name], a_other[layer.name])  # the subset made a difference
        lf = factors.layers[layer.name]
        rotated = lf.gradient_eigenvectors.T @ per_sequence[layer.name] @ lf.activation_eigenvectors
        torch.testing.assert_close(lf.eigenvalues, rotated.square().mean(dim=0))


def test_batch_count_is_the_ceiling_without_rounding_up_exact_products():
    batches = list(range(30))
    assert leading_batch_count(batches, None) is None
    assert [leading_batch_count(batches, f) for f in (0.1, 0.02, 0.5, 1.0, 1e-6)] == [3, 1, 15, 30, 1]
    assert leading_batch_count(iter(batches), 0.25) == 8  # no len: counted


SPLITS = ["covariance_fraction", "correction_fraction"]  # the two splits (tests/test_correction_fraction.py)


@pytest.mark.parametrize("key", SPLITS)
@pytest.mark.parametrize("value", [0, -0.5, 1.5, float("nan"), "0.5", True])
def test_bad_fractions_are_refused_with_the_fix(key, value):
    with pytest.raises(ValueError, match=rf"{key}=.*give a number in \(0, 1\]"):
        FactorArguments(**{key: value})


@pytest.mark.parametrize("strategy", ["diagonal", "identity"])
def test_strategies_without_a_covariance_pass_refuse_a_fraction(strategy):
    with pytest.raises(ValueError, match=f"strategy '{strategy}' does not run; use ekfac or kfac"):
        FactorArguments(strategy=strategy, covariance_fraction=0.5)


@pytest.mark.parametrize("key", SPLITS)
def test_a_directory_fitted_with_another_fraction_is_refused(tmp_path, key):
    model = gpt_neox()
    layers = track_layers(model)
    fit_factors(model, layers, CausalLMTask(), token_batches(8), FactorArguments(**{key: 0.5}, **ARGS),
                output_dir=tmp_path)
    for other in (None, 0.25):
        with pytest.raises(FactorMismatchError, match=f"{key}=0.5"):
            fit_factors(model, layers, CausalLMTask(), token_batches(8),
                        FactorArguments(**{key: other}, **ARGS), output_dir=tmp_path)


@pytest.mark.parametrize("key", SPLITS)
def test_the_influence_config_passes_the_fraction_and_keys_the_cache(key):
    from pathlib import Path

    from omegaconf import OmegaConf

    from experiments.pipeline import cache_key, check_influence_settings, factor_arguments, numerical_settings

    config = OmegaConf.load(Path(__file__).parents[1] / "configs" / "influence" / "ekfac.yaml")
    assert config[key] is None and getattr(factor_arguments(config), key) is None
    before = OmegaConf.create({k: v for k, v in config.items() if k != key})  # an older config
    assert cache_key(numerical_settings(config)) == cache_key(numerical_settings(before))  # old caches still found
    subset = OmegaConf.merge(config, {key: 0.1})
    check_influence_settings(subset)
    assert getattr(factor_arguments(subset), key) == 0.1
    assert cache_key(numerical_settings(subset)) != cache_key(numerical_settings(config))
    for bad in (0, 2, "half"):
        with pytest.raises(ValueError, match=f"influence.{key}="):
            check_influence_settings(OmegaConf.merge(config, {key: bad}))
