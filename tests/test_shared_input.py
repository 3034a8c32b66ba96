"""Input-sharing blocks (influence_core.tracking.share_inputs): layers that read one input (a SwiGLU MLP's gate_proj
and up_proj) tracked as one layer [W_gate; W_up], so EK-FAC keeps the curvature between them."""

from __future__ import annotations

import pytest
import torch

from engine_models import query_batches, token_batches
from influence_core import CausalLMTask, FactorArguments, fit_factors, track_layers
from influence_core.reference.baselines import exact_gauss_newton, exact_ihvp, parameter_gradients
from influence_core.tracking import share_inputs
from test_families import tiny
from test_scores import block_preconditioner, influence

GATE_UP = [["gate_proj", "up_proj"]]


def test_a_block_replaces_its_members_and_stacks_their_outputs():
    model = tiny("llama")
    layers = share_inputs(track_layers(model), GATE_UP)
    assert [l.name for l in layers] == [f"model.layers.{i}.mlp.{p}" for i in range(2)
                                        for p in ("gate_proj+up_proj", "down_proj")]
    block = layers[0]
    assert block.out_features == 2 * 24 and block.member_out_features == (24, 24) and block.input_dim == 16
    with pytest.raises(ValueError, match="is not a tracked layer"):
        share_inputs(track_layers(model), [["gate_proj", "v_proj"]])


def test_block_scores_equal_brute_force():
    """EK-FAC over blocks: score[q, n] = q^T (G_block + lambda I)^{-1} g_n with q, g_n from plain autograd of the
    members' weights, the block preconditioner read from the fitted factors (the check of test_scores.py)."""
    model = tiny("llama", seed=1)
    layers = share_inputs(track_layers(model), GATE_UP)
    fit, train, queries = token_batches(8, seed=5), token_batches(5), query_batches(n=2)
    factors = fit_factors(model, layers, CausalLMTask(), fit, FactorArguments(dtype="float64", progress=False))
    scores = influence(model, layers, factors, queries, train)
    q = parameter_gradients(model, layers, CausalLMTask(), queries, loss="query")
    g = parameter_gradients(model, layers, CausalLMTask(), train)
    torch.testing.assert_close(scores.total, q @ block_preconditioner(factors, layers) @ g.T)


def test_exact_influence_does_not_depend_on_the_blocks():
    """The exact damped Gauss-Newton influence is one number per (query, sequence): the same whether gate and up
    are two layers or one block (only the order of the parameters differs)."""
    model = tiny("llama", seed=2)
    fit, train, queries = token_batches(6, seed=5), token_batches(4), query_batches(n=2)
    results = []
    for layers in (track_layers(model), share_inputs(track_layers(model), GATE_UP)):
        gnh = exact_gauss_newton(model, layers, CausalLMTask(), fit)
        q = parameter_gradients(model, layers, CausalLMTask(), queries, loss="query")
        g = parameter_gradients(model, layers, CausalLMTask(), train)
        results.append(exact_ihvp(gnh, q, 1e-3) @ g.T.double())
    torch.testing.assert_close(results[0], results[1])


def test_members_reading_other_inputs_are_refused():
    model = tiny("llama")
    layers = share_inputs(track_layers(model, ["*self_attn*"]), [["q_proj", "o_proj"]])  # o_proj reads attention
    with pytest.raises(RuntimeError, match="reads another input than the first member"):
        fit_factors(model, layers, CausalLMTask(), token_batches(2), FactorArguments(progress=False))


def test_the_influence_config_selects_blocks_and_refuses_bad_groups():
    from pathlib import Path

    from omegaconf import OmegaConf

    from experiments.pipeline import check_influence_settings, influence_layers

    config = OmegaConf.load(Path(__file__).parents[1] / "configs" / "influence" / "ekfac.yaml")
    assert config.share_inputs is None  # off by default
    model = tiny("llama")
    blocks = OmegaConf.merge(config, {"share_inputs": GATE_UP})
    check_influence_settings(blocks)
    assert [l.name for l in influence_layers(model, blocks)][:1] == ["model.layers.0.mlp.gate_proj+up_proj"]
    for bad in ("gate_proj", [["gate_proj"]], [[1, 2]]):
        with pytest.raises(ValueError, match="influence.share_inputs="):
            check_influence_settings(OmegaConf.merge(config, {"share_inputs": bad}))
