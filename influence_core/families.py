"""Which modules are the MLP (and, opt-in, attention / embedding / unembedding) layers of each model family.

`FAMILIES[model_type][group]` is a tuple of fnmatch globs over module paths (`model.named_modules()`), keyed by
the Hugging Face `config.model_type`. `track_layers(model)` with no patterns tracks the family's "mlp" group,
the paper's choice (Grosse et al. 2023 track the MLP layers). The globs name the MLP's own projections, so a
router (`mlp.gate`), a shared expert's scalar gate (`mlp.shared_expert_gate`) or a norm inside the MLP block is
never tracked by accident. A glob that matches a module holding fused expert weights (3-D parameters, e.g.
Mixtral's `mlp.experts`) tracks every expert's projections as per-expert layers (influence_core/experts.py).

An unknown model_type is refused (one line naming it): pass module patterns instead.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

GROUPS: tuple[str, ...] = ("mlp", "attention", "embedding", "unembedding")

# ---- naming styles shared by several families ------------------------------------------------------------------

_GATED_MLP = ("*.mlp.gate_proj", "*.mlp.up_proj", "*.mlp.down_proj")  # LLaMA-style SwiGLU / GeGLU
_QKVO = ("*.self_attn.q_proj", "*.self_attn.k_proj", "*.self_attn.v_proj", "*.self_attn.o_proj")
_EMBED_TOKENS = ("*.embed_tokens",)
_LM_HEAD = ("lm_head",)
_EXPERTS = ("*.mlp.experts",)  # fused (3-D) expert weights: every expert tracked, see experts.py


def _family(mlp, attention, embedding=_EMBED_TOKENS, unembedding=_LM_HEAD) -> dict[str, tuple[str, ...]]:
    return {"mlp": tuple(mlp), "attention": tuple(attention), "embedding": tuple(embedding),
            "unembedding": tuple(unembedding)}


_LLAMA_STYLE = _family(_GATED_MLP, _QKVO)

FAMILIES: dict[str, dict[str, tuple[str, ...]]] = {
    # the paper's family
    "gpt_neox": _family(("*.mlp.dense_h_to_4h", "*.mlp.dense_4h_to_h"),
                        ("*.attention.query_key_value", "*.attention.dense"), ("*.embed_in",), ("embed_out",)),
    # GPT-2 and its descendants (GPT-2's layers are transformers' Conv1D, weight stored transposed)
    "gpt2": _family(("*.mlp.c_fc", "*.mlp.c_proj"), ("*.attn.c_attn", "*.attn.c_proj"), ("*.wte",)),
    "gpt_bigcode": _family(("*.mlp.c_fc", "*.mlp.c_proj"), ("*.attn.c_attn", "*.attn.c_proj"), ("*.wte",)),
    "gpt_neo": _family(("*.mlp.c_fc", "*.mlp.c_proj"),
                       ("*.attn.attention.q_proj", "*.attn.attention.k_proj", "*.attn.attention.v_proj",
                        "*.attn.attention.out_proj"), ("*.wte",)),
    "starcoder2": _family(("*.mlp.c_fc", "*.mlp.c_proj"),
                          ("*.self_attn.q_proj", "*.self_attn.k_proj", "*.self_attn.v_proj", "*.self_attn.o_proj")),
    # LLaMA-style gated MLPs
    **{name: _LLAMA_STYLE for name in (
        "llama", "mistral", "ministral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
        "olmo3", "stablelm", "cohere", "granite", "helium", "exaone4", "smollm3", "arcee")},
    "phi3": _family(("*.mlp.gate_up_proj", "*.mlp.down_proj"), ("*.self_attn.qkv_proj", "*.self_attn.o_proj")),
    "phi": _family(("*.mlp.fc1", "*.mlp.fc2"),
                   ("*.self_attn.q_proj", "*.self_attn.k_proj", "*.self_attn.v_proj", "*.self_attn.dense")),
    # GPT-J / CodeGen
    "gptj": _family(("*.mlp.fc_in", "*.mlp.fc_out"),
                    ("*.attn.q_proj", "*.attn.k_proj", "*.attn.v_proj", "*.attn.out_proj"), ("*.wte",)),
    "codegen": _family(("*.mlp.fc_in", "*.mlp.fc_out"), ("*.attn.qkv_proj", "*.attn.out_proj"), ("*.wte",)),
    # BLOOM / Falcon / Persimmon: GPT-NeoX-like naming
    "bloom": _family(("*.mlp.dense_h_to_4h", "*.mlp.dense_4h_to_h"),
                     ("*.self_attention.query_key_value", "*.self_attention.dense"), ("*.word_embeddings",)),
    "falcon": _family(("*.mlp.dense_h_to_4h", "*.mlp.dense_4h_to_h"),
                      ("*.self_attention.query_key_value", "*.self_attention.dense"), ("*.word_embeddings",)),
    "persimmon": _family(("*.mlp.dense_h_to_4h", "*.mlp.dense_4h_to_h"),
                         ("*.self_attn.query_key_value", "*.self_attn.dense")),
    # OPT / XGLM / BioGPT: the MLP is fc1/fc2 directly in the decoder layer (no "mlp" in the path)
    "opt": _family(("*.layers.*.fc1", "*.layers.*.fc2"),
                   ("*.self_attn.q_proj", "*.self_attn.k_proj", "*.self_attn.v_proj", "*.self_attn.out_proj")),
    "xglm": _family(("*.layers.*.fc1", "*.layers.*.fc2"),
                    ("*.self_attn.q_proj", "*.self_attn.k_proj", "*.self_attn.v_proj", "*.self_attn.out_proj")),
    "biogpt": _family(("*.layers.*.fc1", "*.layers.*.fc2"),
                      ("*.self_attn.q_proj", "*.self_attn.k_proj", "*.self_attn.v_proj", "*.self_attn.out_proj"),
                      unembedding=("output_projection",)),
    "mpt": _family(("*.ffn.up_proj", "*.ffn.down_proj"), ("*.attn.Wqkv", "*.attn.out_proj"), ("*.wte",)),
    # mixtures of experts: every expert's gated MLP, shared experts, and dense MLP layers where a model has them
    "mixtral": _family(_EXPERTS, _QKVO),
    "olmoe": _family(_EXPERTS, _QKVO),
    "qwen2_moe": _family(_EXPERTS + _GATED_MLP + ("*.mlp.shared_expert.gate_proj", "*.mlp.shared_expert.up_proj",
                                                   "*.mlp.shared_expert.down_proj"), _QKVO),
    "qwen3_moe": _family(_EXPERTS + _GATED_MLP, _QKVO),
}


def model_type(model: nn.Module) -> str | None:
    """config.model_type of a Hugging Face model (None for a plain nn.Module)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def family_patterns(model: nn.Module, groups: Sequence[str] = ("mlp",)) -> tuple[str, ...]:
    """The registry's globs for the model's family and the given groups; one-line errors for what is unknown."""
    if isinstance(groups, str):
        groups = (groups,)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise ValueError(f"module groups {list(groups)}: give some of {list(GROUPS)}")
    kind = model_type(model)
    if kind is None:
        raise ValueError(f"{type(model).__name__} has no config.model_type, so the family's layers are unknown; "
                         "pass module_patterns (fnmatch globs over module paths, e.g. ['*.mlp.*'])")
    if kind not in FAMILIES:
        raise ValueError(f"model_type '{kind}' is not in influence_core.families.FAMILIES; pass module_patterns "
                         f"(fnmatch globs over module paths, e.g. ['*.mlp.*']) naming its MLP layers")
    return tuple(p for g in groups for p in FAMILIES[kind][g])
