"""Bad input gives a clear error, never a silent wrong number."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from engine_models import ClassificationTask, classification_batches, gpt_neox, query_batches, token_batches
from influence_core import (CausalLMTask, FactorArguments, Query, compute_scores, encode_queries, fit_factors,
                            iterate_batches, precondition_queries, query_gradients, track_layers)

QUIET = FactorArguments(progress=False)


@pytest.fixture(scope="module")
def word_tokenizer():
    vocab = {w: i for i, w in enumerate(["[PAD]", "the", "sky", "is", "blue", "Ġblue", "green"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]")


def test_no_tracked_module_matched():
    with pytest.raises(ValueError, match=r"no tracked module matched the patterns \['\*ffn\*'\].*dense_h_to_4h"):
        track_layers(gpt_neox(), ["*ffn*"])


def test_attention_layers_can_be_added():
    names = [l.name for l in track_layers(gpt_neox(), ["*mlp*", "*attention*"])]
    assert "gpt_neox.layers.0.attention.query_key_value" in names and "gpt_neox.layers.0.mlp.dense_h_to_4h" in names


def test_empty_completion_is_refused(word_tokenizer):
    with pytest.raises(ValueError, match="query 'sky' has an empty completion; give at least one token"):
        encode_queries(word_tokenizer, [Query("sky", "the sky is", "")])


def test_queries_mask_the_prompt(word_tokenizer):
    batch = encode_queries(word_tokenizer, [Query("sky", "the sky is", " blue"), Query("x", "the", " sky is")])
    assert batch["labels"][0].tolist() == [-100, -100, -100, 4]
    assert batch["labels"][1].tolist() == [-100, 2, 3, -100]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0]


def test_over_long_sequences_are_refused():
    model = gpt_neox()  # context of 16
    long = token_batches(4, length=20, pad_last=False)
    with pytest.raises(ValueError, match="20 tokens exceed the model's context of 16"):
        fit_factors(model, track_layers(model), CausalLMTask(), long, QUIET)


def test_nan_in_the_model_is_reported():
    model = gpt_neox()
    with torch.no_grad():
        model.gpt_neox.layers[1].mlp.dense_h_to_4h.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        fit_factors(model, track_layers(model), CausalLMTask(), token_batches(4), QUIET)


def test_nan_in_a_training_sequence_score_is_reported():
    model = gpt_neox()
    layers = track_layers(model)
    factors = fit_factors(model, layers, CausalLMTask(), token_batches(4), QUIET)
    queries = precondition_queries(query_gradients(model, layers, CausalLMTask(), query_batches(), progress=False), factors)
    queries[layers[0].name][0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError):
        compute_scores(model, layers, CausalLMTask(), token_batches(4), queries)


def test_empty_data_is_refused():
    model = gpt_neox()
    with pytest.raises(ValueError, match="fitting data is empty"):
        fit_factors(model, track_layers(model), CausalLMTask(), [], QUIET)
    with pytest.raises(ValueError, match="empty"):
        iterate_batches({"input_ids": torch.zeros(0, 4, dtype=torch.long)}, 2)


def test_shared_layer_is_refused():
    layer = nn.Linear(3, 3)
    model = nn.Sequential(layer, nn.Tanh(), layer).double()
    with pytest.raises(RuntimeError, match="ran twice"):
        fit_factors(model, track_layers(model, ["0"]), ClassificationTask(), classification_batches(4, d_in=3, classes=3),
                    QUIET)


def test_model_requires_grad_flags_are_restored():
    model = gpt_neox()
    for p in model.parameters():
        p.requires_grad_(False)
    fit_factors(model, track_layers(model), CausalLMTask(), token_batches(4), QUIET)
    assert not any(p.requires_grad for p in model.parameters())


def test_sampled_labels_follow_the_model_distribution():
    from influence_core.task import sample_labels

    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(100000, 1)
    labels = sample_labels(logits, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(labels, minlength=4).double() / len(labels)
    torch.testing.assert_close(frequencies, torch.softmax(logits[0].double(), -1), atol=5e-3, rtol=0)
    again = sample_labels(logits[:10], torch.Generator().manual_seed(0))
    assert torch.equal(again, labels[:10])  # reproducible from the generator
