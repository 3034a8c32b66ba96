"""The family registry (influence_core/families.py) and per-expert tracking (influence_core/experts.py) on tiny
random models of each family (2 layers, hidden 16, vocab 64): the MLP modules found, and scores equal to brute
force (the comparison of test_scores.py) for a subset of families."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from engine_models import gpt_neox, query_batches, token_batches
from influence_core import CausalLMTask, FactorArguments, fit_factors, track_layers
from influence_core.reference.baselines import parameter_gradients
from influence_core.families import FAMILIES
from test_scores import block_preconditioner, influence

ARGS = dict(dtype="float64", progress=False)
BASE = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            intermediate_size=24, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
EXTRA = {
    "codegen": dict(rotary_dim=4),
    "ministral": dict(head_dim=8),
    "opt": dict(ffn_dim=24, word_embed_proj_dim=16),
    "helium": dict(head_dim=8),
    "gptj": dict(rotary_dim=4),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], num_layers=2),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=12,
                      shared_expert_intermediate_size=20),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=12),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8),
}
EXPERTS = 4

_gated = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
_experts = [f"mlp.experts.{e}.{p}" for e in range(EXPERTS) for p in ("gate_up_proj", "down_proj")]
_llama = ("model.layers.{i}", _gated)
# model_type -> (layer path, the MLP modules of one layer, in module order)
EXPECTED = {
    "gpt_neox": ("gpt_neox.layers.{i}", ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
    "gpt2": ("transformer.h.{i}", ["mlp.c_fc", "mlp.c_proj"]),
    "gpt_bigcode": ("transformer.h.{i}", ["mlp.c_fc", "mlp.c_proj"]),
    "gpt_neo": ("transformer.h.{i}", ["mlp.c_fc", "mlp.c_proj"]),
    "starcoder2": ("model.layers.{i}", ["mlp.c_fc", "mlp.c_proj"]),
    **{name: _llama for name in ("llama", "mistral", "ministral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                                 "olmo", "olmo2", "olmo3", "stablelm", "cohere", "granite", "helium", "exaone4",
                                 "smollm3")},
    "arcee": ("model.layers.{i}", ["mlp.up_proj", "mlp.down_proj"]),  # no gate: a plain up/down MLP
    "phi3": ("model.layers.{i}", ["mlp.gate_up_proj", "mlp.down_proj"]),
    "phi": ("model.layers.{i}", ["mlp.fc1", "mlp.fc2"]),
    "gptj": ("transformer.h.{i}", ["mlp.fc_in", "mlp.fc_out"]),
    "codegen": ("transformer.h.{i}", ["mlp.fc_in", "mlp.fc_out"]),
    "bloom": ("transformer.h.{i}", ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
    "falcon": ("transformer.h.{i}", ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
    "persimmon": ("model.layers.{i}", ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
    "opt": ("model.decoder.layers.{i}", ["fc1", "fc2"]),
    "xglm": ("model.layers.{i}", ["fc1", "fc2"]),
    "biogpt": ("biogpt.layers.{i}", ["fc1", "fc2"]),
    "mpt": ("transformer.blocks.{i}", ["ffn.up_proj", "ffn.down_proj"]),
    "mixtral": ("model.layers.{i}", _experts),
    "olmoe": ("model.layers.{i}", _experts),
    "qwen2_moe": ("model.layers.{i}", _experts + [f"mlp.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")]),
    "qwen3_moe": ("model.layers.{i}", _experts),
}
MOE = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")


def tiny(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"model_type '{model_type}' is not in the installed transformers")
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**BASE, **EXTRA.get(model_type, {})})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # eager experts: the fused default (grouped_mm) has no float64 kernel; tracking replaces it anyway
        model = AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    return model.to(dtype).eval()


def test_every_registered_family_has_an_expected_selection():
    assert sorted(EXPECTED) == sorted(FAMILIES)


@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_registry_finds_the_mlp_modules(model_type):
    model = tiny(model_type, dtype=torch.float32)  # float32: XGLM's attention mask overflows in float64
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    layer, leaves = EXPECTED[model_type]
    expected = [f"{layer.format(i=i)}.{leaf}" for i in range(2) for leaf in leaves]
    assert [l.name for l in track_layers(model)] == expected
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)  # tracking changes no output


def test_gpt_neox_registry_selects_what_mlp_glob_selects():
    model = gpt_neox()
    assert [l.name for l in track_layers(model)] == [l.name for l in track_layers(model, ["*mlp*"])]


def test_opt_mlp_is_found_where_the_old_glob_missed_it():
    model = tiny("opt")
    with pytest.raises(ValueError, match=r"no tracked module matched the patterns \['\*mlp\*'\]"):
        track_layers(model, ["*mlp*"])
    assert len(track_layers(model)) == 4


# every family the issue names (GPT-NeoX, GPT-2, Llama, Mistral, Qwen2, Qwen3, Gemma, OLMo, Phi, Phi3, GPT-J, Falcon,
# Bloom, OPT) and the MoE layouts
@pytest.mark.parametrize("model_type", ["gpt_neox", "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "phi",
                                        "phi3", "gptj", "falcon", "bloom", "opt", "mixtral", "olmoe", "qwen2_moe",
                                        "qwen3_moe"])
def test_family_scores_equal_brute_force(model_type):
    """score[q, n] = q^T (G + lambda I)^{-1} g_n, q and g_n from plain per-example autograd (test_scores)."""
    model = tiny(model_type, seed=1)
    assert_scores_equal_brute_force(model, track_layers(model))


def assert_scores_equal_brute_force(model, layers) -> None:
    """EK-FAC scores over `layers` = q^T (block preconditioner of the fitted factors) g_n, q and g_n from autograd."""
    fit, train, queries = token_batches(8, seed=5), token_batches(5), query_batches(n=2)
    factors = fit_factors(model, layers, CausalLMTask(), fit, FactorArguments(**ARGS))
    scores = influence(model, layers, factors, queries, train)
    q = parameter_gradients(model, layers, CausalLMTask(), queries, loss="query")
    g = parameter_gradients(model, layers, CausalLMTask(), train)
    torch.testing.assert_close(scores.total, q @ block_preconditioner(factors, layers) @ g.T)


def test_attention_and_unembedding_groups():
    model = tiny("llama")
    names = [l.name for l in track_layers(model, groups=("attention", "unembedding"))]
    assert names == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"] + ["lm_head"]
    with pytest.raises(ValueError, match="shares its weight with the input embedding"):
        track_layers(tiny("gpt2"), groups=("unembedding",))  # GPT-2 ties lm_head to wte
    assert [l.name for l in track_layers(model, groups=("embedding",))] == ["model.embed_tokens"]
    with pytest.raises(ValueError, match="shares its weight with the output head"):
        track_layers(tiny("gpt2"), groups=("embedding",))  # GPT-2's wte is its lm_head
    with pytest.raises(ValueError, match="vocabulary of 9,000 tokens"):
        track_layers(AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **{**BASE, "vocab_size": 9000})),
                     groups=("embedding",))


def test_embedding_group_scores_equal_brute_force():
    """The input embedding as an affine layer over one-hot tokens (weight (V, d) = W^T): EK-FAC scores over it
    and the MLP equal q^T (G + lambda I)^{-1} g_n from plain autograd of the embedding and MLP weights."""
    model = tiny("llama", seed=1)
    layers = track_layers(model, groups=("embedding", "mlp"))
    assert layers[0].name == "model.embed_tokens" and (layers[0].in_features, layers[0].out_features) == (64, 16)
    assert_scores_equal_brute_force(model, layers)
    with pytest.raises(ValueError, match=r"module groups \['ffn'\]"):
        track_layers(model, groups=("ffn",))


def test_unknown_family_is_refused_with_the_fix():
    model = tiny("llama")
    model.config.model_type = "my_llama"
    with pytest.raises(ValueError, match="model_type 'my_llama' is not in influence_core.families.FAMILIES; pass "
                                         "module_patterns"):
        track_layers(model)
    assert len(track_layers(model, ["*mlp*"])) == 6  # patterns still work
    with pytest.raises(ValueError, match="Sequential has no config.model_type"):
        track_layers(nn.Sequential(nn.Linear(2, 2)))


def test_mlp_glob_tracks_the_experts_too():
    model = tiny("mixtral")
    assert [l.name for l in track_layers(model, ["*mlp*"])] == [l.name for l in track_layers(model)]


def test_an_expert_sees_only_its_routed_tokens():
    from influence_core.tracking import LayerCapture

    model = tiny("olmoe")
    layers = track_layers(model)
    batch = {"input_ids": torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(1))}
    block = model.model.layers[0].mlp
    routed = {}
    handle = block.gate.register_forward_hook(lambda m, i, out: routed.update(index=out[2]))
    with LayerCapture(layers) as capture:
        capture.clear(batch)
        model(**batch)
    handle.remove()
    index = routed["index"]  # (B * T, k) experts chosen per token
    for e in range(EXPERTS):
        a = capture.activations[f"model.layers.0.mlp.experts.{e}.gate_up_proj"].reshape(18, -1)
        chosen = (index == e).any(dim=-1)
        assert bool((a[~chosen] == 0).all()) and bool((a[chosen].abs().sum(-1) > 0).all())


def test_fused_expert_flags_are_restored():
    from influence_core.tracking import tracked_parameters_require_grad

    model = tiny("mixtral")
    layers = track_layers(model)
    fused = model.model.layers[0].mlp.experts.gate_up_proj
    fused.requires_grad_(False)
    with tracked_parameters_require_grad(layers):
        assert fused.requires_grad
    assert not fused.requires_grad


def test_unsupported_fused_experts_are_refused_not_skipped():
    model = tiny("gpt_oss")
    with pytest.raises(ValueError, match=r"experts stored as fused 3-D tensors in 'model.layers.0.mlp.experts' "
                                         r"\(GptOssExperts: .*\) are not tracked yet"):
        track_layers(model, ["*mlp*"])


def test_curvature_methods_refuse_expert_views():
    from influence_core.reference.gnh import gnh_vector_product

    model = tiny("qwen3_moe")
    layers = track_layers(model)
    with pytest.raises(ValueError, match="Gauss-Newton-vector product does not support experts"):
        gnh_vector_product(model, layers, CausalLMTask(), token_batches(2), torch.zeros(5))


def influence_config():
    from omegaconf import OmegaConf

    from pathlib import Path

    return OmegaConf.load(Path(__file__).parents[1] / "configs" / "influence" / "ekfac.yaml")


@pytest.mark.parametrize("model_type, expected", [
    ("opt", ["model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2", "model.decoder.layers.1.fc1",
             "model.decoder.layers.1.fc2"]),
    ("gpt_neox", ["gpt_neox.layers.0.mlp.dense_h_to_4h", "gpt_neox.layers.0.mlp.dense_4h_to_h",
                  "gpt_neox.layers.1.mlp.dense_h_to_4h", "gpt_neox.layers.1.mlp.dense_4h_to_h"])])
def test_the_config_default_tracks_the_family_mlp(model_type, expected):
    """influence.module_patterns defaults to 'auto': the registry's MLP layers (OPT's fc1/fc2, which '*mlp*' misses)."""
    from experiments.pipeline import check_influence_settings, influence_layers

    influence = influence_config()
    assert influence.module_patterns == "auto"
    check_influence_settings(influence)
    model = tiny(model_type)
    assert sorted(l.name for l in influence_layers(model, influence)) == sorted(expected)


def test_explicit_patterns_are_honoured_and_null_is_refused():
    from experiments.pipeline import check_influence_settings, influence_layers

    influence = influence_config()
    influence.module_patterns = ["*dense_4h_to_h"]
    check_influence_settings(influence)
    names = [l.name for l in influence_layers(tiny("gpt_neox"), influence)]
    assert names == ["gpt_neox.layers.0.mlp.dense_4h_to_h", "gpt_neox.layers.1.mlp.dense_4h_to_h"]
    for bad in (None, "*mlp*", []):
        influence.module_patterns = bad
        with pytest.raises(ValueError, match="give 'auto' for the model family's MLP layers .* or a list"):
            check_influence_settings(influence)


def test_cache_keys_hold_the_resolved_layer_names(tmp_path, monkeypatch):
    """Under 'auto' the same config can mean other layers (another registry entry): the cache folders differ."""
    import pandas as pd

    import experiments.pipeline as pipeline

    model = tiny("gpt_neox")
    loaded = pipeline.LoadedModel("tiny", "tiny", model, None, "weights")
    ids = torch.ones(2, 4, dtype=torch.long)
    corpus = pipeline.Corpus("c", "train", "text", ["a", "b"], pd.DataFrame(index=range(2)),
                             {"input_ids": ids, "attention_mask": ids, "labels": ids}, "corpus")
    settings = pipeline.ScoringSettings()
    first = pipeline.plan_scores(loaded, corpus, [], influence_config(), settings, tmp_path)
    monkeypatch.setattr(pipeline, "influence_layers", lambda model, influence: track_layers(model)[:2])
    fewer = pipeline.plan_scores(loaded, corpus, [], influence_config(), settings, tmp_path)
    assert first.factors_dir != fewer.factors_dir and first.scores_dir != fewer.scores_dir
