"""Mixed precision and devices: a bf16/fp16 model runs forward and backward in its dtype, the engine accumulates in
float32; `device` (cpu, cuda, auto) and `dtype` settings reach the loaded model.

Tolerances, with the values measured on these tiny random models (CPU, torch 2.13; trained models in
figures/bench/precision_cpu.md, made by benchmarks/precision.py):
- bf16 against fp32 (the weights rounded to bf16 included): Pearson of all scores >= 0.998 (measured GPT-NeoX
  0.99995, Llama 0.9994), top-10 overlap of every query >= 0.8 and its mean >= 0.9 (measured min 0.9, mean 0.99),
  relative Frobenius error of the activation and gradient covariances <= 0.05 per layer (measured GPT-NeoX 0.2% and
  0.3%, Llama 0.4% and 2.3%: the gradient covariance moves most, as a sampled label flips where bf16 shifts the
  model's probabilities). The preconditioned queries differ more (1.8%, 8.5%) and are not bounded here.
- float32 accumulation of bf16 tensors: the engine's covariances and query gradients equal a float64 sum of the
  same bf16 activations and output gradients to 1e-5 (relative); a bf16 sum would be off by ~1e-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from benchmarks.precision import compare, pearson, relative_error, run_engine, top_k_overlap
from influence_core import (CausalLMTask, FactorArguments, LayerCapture, fit_factors, iterate_batches,
                            precondition_queries, query_gradients, track_layers)
from influence_core.batch import accumulation_dtype, real_token_activations, upcast
from influence_core.distributed import resolve_device
from influence_core.factors.stages import read_tensors
from influence_core.scores import compute_scores
from influence_core.tracking import tracked_parameters_require_grad

REPO = Path(__file__).resolve().parents[1]
VOCAB = 64
PEARSON_MIN = 0.998
TOP10_MIN, TOP10_MEAN_MIN = 0.8, 0.9
COVARIANCE_REL_ERR_MAX = 0.05
ACCUMULATION_REL_TOL = 1e-5


def tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt_neox":
        config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64)
        return GPTNeoXForCausalLM(config).eval()
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def data(num_train: int = 64, num_queries: int = 8, length: int = 16):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (num_train + num_queries, length), generator=g)
    mask = torch.ones_like(ids)
    mask[::5, 12:] = 0  # some right padding
    rows = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    train = {k: v[:num_train] for k, v in rows.items()}
    queries = {k: v[num_train:].clone() for k, v in rows.items()}
    queries["labels"][:, :8] = -100  # prompt
    return train, queries


# ---- the metrics, on hand-made tables -------------------------------------------------------------------------------

def test_agreement_metrics_on_hand_made_tables():
    reference = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    swapped = torch.tensor([[5.0, 4.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0]])  # row 0: top 2 kept, 3rd lost
    assert top_k_overlap(reference, swapped, k=2).tolist() == [1.0, 1.0]
    assert top_k_overlap(reference, swapped, k=3).tolist() == pytest.approx([2 / 3, 1.0])
    assert pearson(reference, 2 * reference + 1) == pytest.approx(1.0)
    assert pearson(reference, -reference) == pytest.approx(-1.0)
    assert relative_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5])) == pytest.approx(0.1)


# ---- float32 accumulation of a bf16 model ---------------------------------------------------------------------------

def test_accumulation_dtype_is_float32_at_least():
    assert accumulation_dtype(torch.bfloat16) == accumulation_dtype(torch.float16) == torch.float32
    assert accumulation_dtype(torch.float32) == torch.float32 and accumulation_dtype(torch.float64) == torch.float64
    x = torch.ones(2, dtype=torch.float32)
    assert upcast(x) is x and upcast(x.bfloat16()).dtype == torch.float32


def test_bf16_model_accumulates_in_float32(tmp_path):
    """Covariances and query gradients of a bf16 model equal float64 sums of its own bf16 activations and output
    gradients (to float32 rounding); factors, preconditioned queries and scores are float32."""
    model, task = tiny("gpt_neox").to(torch.bfloat16), CausalLMTask()
    layers = track_layers(model, ["*mlp*"])
    train, queries = data(num_train=24)
    factors = fit_factors(model, layers, task, iterate_batches(train, 8), FactorArguments(progress=False),
                          output_dir=tmp_path)
    covariance = read_tensors(tmp_path / "covariance.safetensors")

    # brute force: the same bf16 forward, every product and sum in float64
    sums = {l.name: 0.0 for l in layers}
    tokens = 0.0
    with torch.no_grad(), LayerCapture(layers) as capture:
        for batch in iterate_batches(train, 8):
            capture.clear(batch)
            task.forward(model, batch)
            for layer in layers:
                a = real_token_activations(task, batch, capture.activations[layer.name].double())
                sums[layer.name] = sums[layer.name] + torch.einsum("bti,btj->ij", a, a)
            tokens += float(batch["attention_mask"].sum())
    for layer in layers:
        engine = covariance[f"{layer.name}.activation_covariance"]
        assert engine.dtype == torch.float32
        assert relative_error(sums[layer.name] / tokens, engine) < ACCUMULATION_REL_TOL

    raw = query_gradients(model, layers, task, iterate_batches(queries, 4), progress=False)
    exact = {l.name: [] for l in layers}
    with tracked_parameters_require_grad(layers), LayerCapture(layers) as capture:
        for batch in iterate_batches(queries, 4):
            capture.clear(batch)
            grads = capture.output_gradients(task.query_loss(model, batch))
            for layer in layers:
                a = real_token_activations(task, batch, capture.activations[layer.name].double())
                exact[layer.name].append(torch.einsum("bto,bti->boi", grads[layer.name].double(), a))
    for layer in layers:
        assert raw[layer.name].dtype == torch.float32
        assert relative_error(torch.cat(exact[layer.name]), raw[layer.name]) < ACCUMULATION_REL_TOL

    preconditioned = precondition_queries(raw, factors)
    fused = query_gradients(model, layers, task, iterate_batches(queries, 4), progress=False, factors=factors)
    for layer in layers:
        assert factors.layers[layer.name].eigenvalues.dtype == torch.float32
        assert preconditioned[layer.name].dtype == fused[layer.name].dtype == torch.float32
        # the fused route rotates the tokens before summing them (EigenbasisFactors.precondition_query): the same
        # numbers in another float32 summation order, so compared as a whole, not entry by entry
        assert relative_error(preconditioned[layer.name].double(), fused[layer.name]) < ACCUMULATION_REL_TOL
    scores = compute_scores(model, layers, task, iterate_batches(train, 8), fused)
    assert scores.total.dtype == torch.float32 and torch.isfinite(scores.total).all()


# ---- bf16 against fp32 ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_bf16_scores_agree_with_float32(family, tmp_path):
    train, queries = data()
    fp32 = run_engine(tiny(family), train, queries, tmp_path / "fp32")
    bf16 = run_engine(tiny(family).to(torch.bfloat16), train, queries, tmp_path / "bf16")
    row = compare(fp32, bf16)
    assert row["pearson"] >= PEARSON_MIN, row
    assert row["top10_min"] >= TOP10_MIN and row["top10_mean"] >= TOP10_MEAN_MIN, row
    assert row["activation_cov_rel_err"] <= COVARIANCE_REL_ERR_MAX, row
    assert row["gradient_cov_rel_err"] <= COVARIANCE_REL_ERR_MAX, row


# ---- device and dtype settings --------------------------------------------------------------------------------------

def test_device_settings():
    expected_auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected_auto and resolve_device(None).type == expected_auto
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available.*device=auto"):
            resolve_device("cuda")


def test_model_configs_name_a_dtype_and_a_device():
    for path in sorted((REPO / "configs" / "model").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        assert cfg.get("dtype") in ("float32", "bfloat16", "float16", "auto"), path
        assert cfg.get("device") in ("cpu", "cuda", "auto") or str(cfg.get("device")).startswith("cuda:"), path


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A tiny Llama and a byte-level tokenizer saved with save_pretrained, and a jsonl corpus."""
    from experiments.zoo.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("precision_llama")
    texts = [f"the number {i} follows the number {i - 1} and comes before {i + 1}." for i in range(40)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=32,
                                         max_position_embeddings=64))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return root


def test_studies_load_the_model_in_its_dtype_on_device_auto(saved_llama):
    from experiments.loading import load_model_and_tokenizer
    from experiments.study import load_study_inputs

    model, _ = load_model_and_tokenizer(saved_llama / "model", dtype="bf16", device="auto")
    parameter = next(model.parameters())
    assert parameter.dtype == torch.bfloat16 and parameter.device.type == resolve_device("auto").type
    model_cfg = OmegaConf.create({"name_or_path": str(saved_llama / "model"), "dtype": "bfloat16", "device": "auto",
                                  "seed": None})
    data_cfg = OmegaConf.create({"path": str(saved_llama / "corpus.jsonl"), "split": "train", "text_column": "text",
                                 "truncation": False, "max_length": 32})
    inputs = load_study_inputs("tiny_llama", model_cfg, data_cfg, [])
    parameter = next(inputs.loaded.model.parameters())
    assert parameter.dtype == torch.bfloat16 and parameter.device.type == resolve_device("auto").type
    assert len(inputs.corpus) == 40
    with pytest.raises(ValueError, match="not a device"):
        load_model_and_tokenizer(saved_llama / "model", device="tpu-please")
