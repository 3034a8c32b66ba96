"""Correction subset (FactorArguments.correction_fraction = f): A and S from all fitting batches, the eigenvalue
correction from the first ceil(f x batches) only (issue 19's "other split"); with a token cache, only those batches'
tokens are kept. Its brute-force check, range check, directory key and Hydra key are parametrized beside
covariance_fraction's (tests/test_covariance_subset.py, SPLITS)."""

from __future__ import annotations

import pytest
import torch

import influence_core.factors.passes as passes
from engine_models import gpt_neox, token_batches
from influence_core import CausalLMTask, FactorArguments, fit_factors, track_layers

ARGS = dict(dtype="float64", progress=False)
BIG = 2**30


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


@pytest.mark.parametrize("strategy", ["kfac", "diagonal", "identity"])
def test_strategies_other_than_ekfac_refuse_a_correction_fraction(strategy):
    with pytest.raises(ValueError, match=f"strategy .{strategy}. has none to subset: use ekfac"):
        FactorArguments(strategy=strategy, correction_fraction=0.5)
