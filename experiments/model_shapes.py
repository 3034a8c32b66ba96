"""Published shapes of real models, so a memory plan needs no weights and no network.

Each entry builds the transformers config of the model from its published hyperparameters (Pythia: Biderman
et al. 2023, Table 1; GPT-2: Radford et al. 2019; Llama 3 8B: its model card); `meta_model(name)` instantiates
it on the meta device (shapes only, no memory). A path to a folder with config.json works too.
"""

from __future__ import annotations

from pathlib import Path

PYTHIA = {  # name: (layers, d_model, heads, vocab)
    "pythia-70m": (6, 512, 8, 50304), "pythia-160m": (12, 768, 12, 50304), "pythia-410m": (24, 1024, 16, 50304),
    "pythia-1b": (16, 2048, 8, 50304), "pythia-1.4b": (24, 2048, 16, 50304), "pythia-2.8b": (32, 2560, 32, 50304),
    "pythia-6.9b": (32, 4096, 32, 50432), "pythia-12b": (36, 5120, 40, 50688),
}
GPT2 = {"gpt2": (12, 768, 12), "gpt2-medium": (24, 1024, 16), "gpt2-large": (36, 1280, 20), "gpt2-xl": (48, 1600, 25)}
KNOWN = sorted([*PYTHIA, *GPT2, "llama-3-8b"])


def model_config(name_or_path: str):
    """A transformers config for a known model name, or the config.json of a local folder."""
    from transformers import AutoConfig, GPT2Config, GPTNeoXConfig, LlamaConfig

    if name_or_path in PYTHIA:
        layers, width, heads, vocab = PYTHIA[name_or_path]
        return GPTNeoXConfig(num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads,
                             intermediate_size=4 * width, vocab_size=vocab, max_position_embeddings=2048,
                             rotary_pct=0.25)
    if name_or_path in GPT2:
        layers, width, heads = GPT2[name_or_path]
        return GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=50257, n_positions=1024)
    if name_or_path == "llama-3-8b":
        return LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
    if (Path(name_or_path) / "config.json").exists():
        return AutoConfig.from_pretrained(name_or_path)
    raise ValueError(f"unknown model {name_or_path!r}: use one of {KNOWN} or a folder with config.json")


def meta_model(name_or_path: str, dtype: str = "float32"):
    """The model on the meta device: every module and shape, no weights, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(name_or_path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
