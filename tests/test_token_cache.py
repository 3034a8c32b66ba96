"""One-pass EK-FAC (FactorArguments.token_cache_bytes > 0): the covariance pass keeps every batch's per-token a and g,
and the eigenvalue correction is computed from them instead of from a second model pass. Its numbers are those of a
two-pass fit whose correction draws the covariance pass's labels (correction_pass(label_pass=0))."""

from __future__ import annotations

import json

import pytest
import torch

import influence_core.factors.passes as passes
from engine_models import gpt_neox, token_batches
from influence_core import CausalLMTask, FactorArguments, fit_factors, track_layers
from influence_core.factors.types import FactorMismatchError

ARGS = dict(dtype="float64", progress=False)
BIG = 2**30


def two_passes_with_the_covariance_labels(model, layers, batches, args):
    """The reference: covariance pass, eigendecomposition, then a model pass drawing pass 0's labels again."""
    cov = passes.covariance_pass(model, layers, CausalLMTask(), batches, args)
    eig = passes.eigendecomposition(cov, [l.name for l in layers], args)
    return eig, passes.correction_pass(model, layers, CausalLMTask(), batches, args, eig, label_pass=0)


def padded_batches(count: int, batch_size: int = 4):
    """token_batches with the last two tokens of every other row padded, so the activations are masked."""
    batches = token_batches(count, batch_size=batch_size)
    for batch in batches:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        batch["attention_mask"][::2, -2:] = 0
    return batches


@pytest.mark.parametrize("blocks", [None, 2])
def test_one_pass_fit_equals_two_passes_with_the_covariance_labels(blocks):
    model = gpt_neox()
    layers = track_layers(model)
    batches = padded_batches(12)
    args = FactorArguments(output_blocks=blocks, **ARGS)
    eig, correction = two_passes_with_the_covariance_labels(model, layers, batches, args)
    real, calls = passes.pseudo_gradients, []
    try:
        passes.pseudo_gradients = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
        one_pass = fit_factors(model, layers, CausalLMTask(), batches,
                               FactorArguments(output_blocks=blocks, token_cache_bytes=BIG, **ARGS))
    finally:
        passes.pseudo_gradients = real
    assert len(calls) == len(batches)  # one model pass
    assert one_pass.manifest["correction_labels"] == "covariance pass"
    for layer in layers:
        lf = one_pass.layers[layer.name]
        torch.testing.assert_close(lf.eigenvalues, correction[f"{layer.name}.eigenvalues"], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(lf.activation_eigenvectors, eig[f"{layer.name}.activation_eigenvectors"])
        torch.testing.assert_close(lf.gradient_eigenvectors, eig[f"{layer.name}.gradient_eigenvectors"])


def test_the_two_pass_default_draws_other_labels_for_its_correction():
    """Same eigenbasis (same covariance pass), another correction: the one-pass fit is not the default fit."""
    model = gpt_neox()
    layers = track_layers(model)
    default = fit_factors(model, layers, CausalLMTask(), token_batches(8), FactorArguments(**ARGS))
    one_pass = fit_factors(model, layers, CausalLMTask(), token_batches(8), FactorArguments(token_cache_bytes=BIG, **ARGS))
    assert default.manifest["correction_labels"] == "own pass"
    for name, lf in default.layers.items():
        assert torch.equal(lf.activation_eigenvectors, one_pass.layers[name].activation_eigenvectors)
        assert not torch.allclose(lf.eigenvalues, one_pass.layers[name].eigenvalues)


def test_a_budget_too_small_is_refused_before_any_model_pass(monkeypatch):
    model = gpt_neox()
    layers = track_layers(model)
    batches = token_batches(8, batch_size=4)
    calls = []
    monkeypatch.setattr(passes, "pseudo_gradients", lambda *a, **k: calls.append(1))
    per_token = sum(l.input_dim + l.out_features for l in layers) * 8  # float64
    need = 2 * 4 * batches[0]["input_ids"].shape[1] * per_token
    with pytest.raises(ValueError, match=rf"token_cache_bytes={need - 1} is too small: .* raise it above {need}, or set "
                                         "it to 0 for a second model pass"):
        fit_factors(model, layers, CausalLMTask(), batches, FactorArguments(token_cache_bytes=need - 1, **ARGS))
    assert calls == []


def test_the_cache_refuses_to_grow_past_its_budget_while_it_fills():
    cache = passes.TokenCache(budget_bytes=500)
    cache.add({"layer": (torch.zeros(2, 10), [torch.zeros(2, 10)])}, 2)  # 160 bytes (float32)
    with pytest.raises(ValueError, match=r"token_cache_bytes=500 is too small: .* of the first 2 batches"):
        cache.add({"layer": (torch.zeros(8, 10), [torch.zeros(8, 10)])}, 8)  # 640 more
    assert len(cache) == 1


def test_a_rerun_after_the_covariance_stage_gives_the_same_factors(tmp_path, monkeypatch):
    """The process dies in the correction: the rerun reads the saved covariances (no tokens kept then) and runs a
    model pass with the covariance pass's labels instead, which gives the uninterrupted fit's numbers."""
    model = gpt_neox()
    layers = track_layers(model)
    args = FactorArguments(token_cache_bytes=BIG, **ARGS)
    whole = fit_factors(model, layers, CausalLMTask(), token_batches(8), args)

    def die(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(passes, "correction_from_cache", die)
    with pytest.raises(KeyboardInterrupt):
        fit_factors(model, layers, CausalLMTask(), token_batches(8), args, output_dir=tmp_path)
    assert "covariance" in json.loads((tmp_path / "manifest.json").read_text())["stages_done"]
    rerun = fit_factors(model, layers, CausalLMTask(), token_batches(8), args, output_dir=tmp_path)
    for name, lf in whole.layers.items():
        torch.testing.assert_close(rerun.layers[name].eigenvalues, lf.eigenvalues, rtol=1e-10, atol=1e-14)


def test_one_pass_and_two_pass_directories_refuse_each_other(tmp_path):
    model = gpt_neox()
    layers = track_layers(model)
    fit_factors(model, layers, CausalLMTask(), token_batches(8), FactorArguments(token_cache_bytes=BIG, **ARGS),
                output_dir=tmp_path / "one")
    with pytest.raises(FactorMismatchError, match="correction_labels='covariance pass'"):
        fit_factors(model, layers, CausalLMTask(), token_batches(8), FactorArguments(**ARGS), output_dir=tmp_path / "one")
    fit_factors(model, layers, CausalLMTask(), token_batches(8), FactorArguments(**ARGS), output_dir=tmp_path / "two")
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    del manifest["correction_labels"]  # a directory written before the setting existed: two passes
    (tmp_path / "two" / "manifest.json").write_text(json.dumps(manifest))
    fit_factors(model, layers, CausalLMTask(), token_batches(8), FactorArguments(**ARGS), output_dir=tmp_path / "two")
    with pytest.raises(FactorMismatchError, match="correction_labels='own pass'"):
        fit_factors(model, layers, CausalLMTask(), token_batches(8), FactorArguments(token_cache_bytes=BIG, **ARGS),
                    output_dir=tmp_path / "two")


@pytest.mark.parametrize("settings, refused", [
    (dict(strategy="kfac"), "strategy 'kfac' does not run; use ekfac"),
    (dict(fisher="expected"), "fisher='expected' has one per class"),
    (dict(covariance_fraction=0.5), "covariance_fraction=0.5 asks for A and S from fewer"),
    (dict(checkpoint_every=5), "use checkpoint_every=0"),
])
def test_settings_a_one_pass_fit_cannot_honour_are_refused(settings, refused):
    with pytest.raises(ValueError, match=refused):
        FactorArguments(token_cache_bytes=BIG, **settings)


def test_a_checkpoint_set_after_construction_is_refused_too(tmp_path):
    model = gpt_neox()
    args = FactorArguments(token_cache_bytes=BIG, **ARGS)
    args.checkpoint_every = 2
    with pytest.raises(ValueError, match="checkpoint_every=2"):
        fit_factors(model, track_layers(model), CausalLMTask(), token_batches(8), args, output_dir=tmp_path)


def test_the_influence_config_passes_the_budget_and_keys_the_cache():
    from pathlib import Path

    from omegaconf import OmegaConf

    from experiments.pipeline import cache_key, check_influence_settings, factor_arguments, numerical_settings

    config = OmegaConf.load(Path(__file__).parents[1] / "configs" / "influence" / "ekfac.yaml")
    assert config.token_cache_bytes == 0 and factor_arguments(config).token_cache_bytes == 0
    before = OmegaConf.create({k: v for k, v in config.items() if k != "token_cache_bytes"})
    assert cache_key(numerical_settings(config)) == cache_key(numerical_settings(before))
    one_pass = OmegaConf.merge(config, {"token_cache_bytes": BIG})
    check_influence_settings(one_pass)
    assert factor_arguments(one_pass).token_cache_bytes == BIG
    assert cache_key(numerical_settings(one_pass)) != cache_key(numerical_settings(config))
    with pytest.raises(ValueError, match=r"influence.token_cache_bytes=-1: give an integer >= 0"):
        check_influence_settings(OmegaConf.merge(config, {"token_cache_bytes": -1}))


def test_the_cache_holds_the_bytes_it_counts():
    """A view into a larger storage (e.g. a slice of a fused input) is copied, so the kept bytes are the counted ones;
    a tensor that owns exactly its storage is kept as it is."""
    cache = passes.TokenCache(budget_bytes=2**20)
    whole, fused = torch.randn(2, 3, 8), torch.randn(2, 3, 32)
    cache.add({"layer": (whole, [fused[..., :8]])}, 2)
    (a, (g,)), = [kept["layer"] for kept in cache.drain()]
    assert a is whole
    assert torch.equal(g, fused[..., :8]) and g.untyped_storage().nbytes() == g.numel() * 4
    assert cache.nbytes == 2 * 2 * 3 * 8 * 4 and len(cache) == 0
