"""Regression tests for defects of an independent review: silent wrong numbers, and unclear errors made clear."""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from engine_models import (VOCAB, FixedLabelTask, gpt_neox, query_batches, token_batches)
from influence_core import (CausalLMTask, FactorArguments, FactorMismatchError, ScoreArguments, compute_scores,
                            fit_factors, iterate_batches, load_factors, precondition_queries, query_gradients,
                            track_layers)
from influence_core.reference.baselines import parameter_gradients, unflatten_layers
from influence_core.sharding import read_scores, score_in_shards, shard_path
from test_factors import PseudoLabelsAsTraining
from test_scores import block_preconditioner

ARGS = dict(dtype="float64", progress=False)


def influence(model, layers, factors, queries, train, task=None):
    task = task or CausalLMTask()
    q = precondition_queries(query_gradients(model, layers, task, queries, progress=False), factors)
    return compute_scores(model, layers, task, train, q, args=ScoreArguments(progress=False))


def opt(seed: int = 0):
    """OPT flattens hidden states to (B * T, d) before fc1/fc2."""
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, ffn_dim=12,
                       max_position_embeddings=16, word_embed_proj_dim=8, dropout=0.0, attention_dropout=0.0)
    return OPTForCausalLM(config).double().eval()


# ----------------------------------------------------------------------------------------------------------
# 1. Layers fed flattened (tokens x features) inputs


def test_opt_flattened_fc_layers_score_per_sequence():
    model = opt()
    layers = track_layers(model, ["*fc1", "*fc2"])
    assert len(layers) == 4
    fit, train, queries = token_batches(10, seed=5), token_batches(7), query_batches()
    factors = fit_factors(model, layers, CausalLMTask(), fit, FactorArguments(**ARGS))
    scores = influence(model, layers, factors, queries, train)
    assert scores.total.shape == (3, 7)
    q = parameter_gradients(model, layers, CausalLMTask(), queries, loss="query")
    g = parameter_gradients(model, layers, CausalLMTask(), train)
    torch.testing.assert_close(scores.total, q @ block_preconditioner(factors, layers) @ g.T)


def test_opt_eigenvalue_correction_is_per_sequence(tmp_path):
    model = opt()
    layers = track_layers(model, ["*fc1", "*fc2"])
    batches = token_batches(10)
    factors = fit_factors(model, layers, FixedLabelTask(), batches, FactorArguments(**ARGS), output_dir=tmp_path)
    from safetensors.torch import load_file
    assert float(load_file(tmp_path / "covariance.safetensors")["num_sequences"]) == 10
    per_sequence = unflatten_layers(layers, parameter_gradients(model, layers, PseudoLabelsAsTraining(), batches))
    for layer in layers:
        lf = factors.layers[layer.name]
        rotated = lf.gradient_eigenvectors.T @ per_sequence[layer.name] @ lf.activation_eigenvectors
        torch.testing.assert_close(lf.eigenvalues, rotated.square().mean(dim=0))  # mean over 10 sequences


def test_two_dimensional_input_of_unexpected_rows_is_refused():
    from influence_core.tracking import LayerCapture

    model = opt()
    layers = track_layers(model, ["*fc1"])
    with LayerCapture(layers) as capture:
        capture.clear({"input_ids": torch.zeros(3, 5, dtype=torch.long)})  # claims (3, 5); the forward is (2, 4)
        with pytest.raises(ValueError, match=r"'model.decoder.layers.0.fc1' got a 2-D input of 8 rows"):
            model(input_ids=torch.zeros(2, 4, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------
# 2. Labels not masked at padding


def test_unmasked_labels_at_padding_give_the_masked_scores():
    model = gpt_neox()
    layers = track_layers(model)
    task = CausalLMTask()
    factors = fit_factors(model, layers, task, token_batches(8), FactorArguments(**ARGS))
    masked = token_batches(6)  # row 0 padded, its labels -100 there
    unmasked = [{**b, "labels": b["input_ids"].clone()} for b in masked]
    assert bool((unmasked[0]["labels"] != masked[0]["labels"]).any())
    expected = influence(model, layers, factors, query_batches(), masked)
    got = influence(model, layers, factors, query_batches(), unmasked)
    torch.testing.assert_close(got.total, expected.total)
    q = parameter_gradients(model, layers, task, query_batches(), loss="query")
    g = parameter_gradients(model, layers, task, masked)
    torch.testing.assert_close(got.total, q @ block_preconditioner(factors, layers) @ g.T)
    # and the fitted factors do not depend on the labels at padding either
    refit = fit_factors(model, layers, task, [{**b, "labels": b["input_ids"]} for b in token_batches(8)],
                        FactorArguments(**ARGS))
    for name in factors.layers:
        torch.testing.assert_close(refit.layers[name].eigenvalues, factors.layers[name].eigenvalues)


# ----------------------------------------------------------------------------------------------------------
# 3. Factors of another model


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("factors")
    model = gpt_neox(seed=0)
    layers = track_layers(model)
    fit_factors(model, layers, CausalLMTask(), token_batches(8), FactorArguments(**ARGS), output_dir=directory)
    return directory


def test_factors_of_another_model_are_refused_everywhere(fitted):
    other = gpt_neox(seed=1)  # same layer names and shapes, other weights
    layers = track_layers(other)
    factors = load_factors(fitted)  # no layers given: checked where they meet layers
    task = CausalLMTask()
    with pytest.raises(FactorMismatchError, match="fingerprint .* refit the factors"):
        query_gradients(other, layers, task, query_batches(), progress=False, factors=factors)
    raw = query_gradients(other, layers, task, query_batches(), progress=False)
    with pytest.raises(FactorMismatchError, match=f"layer '{layers[0].name}' were fitted on a model with fingerprint"):
        precondition_queries(raw, factors)
    # queries of model 0 scored on model 1
    model = gpt_neox(seed=0)
    own = precondition_queries(query_gradients(model, track_layers(model), task, query_batches(), progress=False),
                               factors)
    with pytest.raises(FactorMismatchError, match="computed on a model with fingerprint"):
        compute_scores(other, layers, task, token_batches(4), own, args=ScoreArguments(progress=False))
    # a subset of the fitted layers on the right model is fine
    subset = track_layers(model)[:2]
    query_gradients(model, subset, task, query_batches(), progress=False, factors=factors)


def test_factors_of_other_shapes_are_refused_clearly(fitted):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    wider = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=20, max_position_embeddings=16)).double().eval()
    layers = track_layers(wider)
    factors = load_factors(fitted)
    with pytest.raises(FactorMismatchError, match=r"fitted for \(d_out, d_in\+1\) = \(12, 9\), but here it is \(20, 9\)"):
        query_gradients(wider, layers, CausalLMTask(), query_batches(), progress=False, factors=factors)
    raw = query_gradients(wider, layers, CausalLMTask(), query_batches(), progress=False)
    with pytest.raises(FactorMismatchError, match="another model"):
        precondition_queries(dict(raw), factors)  # a plain dict: shapes still checked
    model = gpt_neox(seed=0)
    own = precondition_queries(query_gradients(model, track_layers(model), CausalLMTask(), query_batches(),
                                               progress=False), factors)
    with pytest.raises(FactorMismatchError, match="have shape"):
        compute_scores(wider, layers, CausalLMTask(), token_batches(4), dict(own), args=ScoreArguments(progress=False))


# ----------------------------------------------------------------------------------------------------------
# 4. Queries without a completion label


def test_query_without_completion_labels_is_refused():
    model = gpt_neox()
    layers = track_layers(model)
    batch = dict(query_batches()[0])
    labels = batch["labels"].clone()
    labels[1] = -100
    with pytest.raises(ValueError, match=r"query 1 has no completion label"):
        query_gradients(model, layers, CausalLMTask(), [{**batch, "labels": labels}], progress=False)
    labels = batch["labels"].clone()
    labels[2, 1:] = -100  # only the first position labelled: nothing predicts it
    split = iterate_batches({**batch, "labels": labels}, 2)
    with pytest.raises(ValueError, match=r"query 2 has no completion label"):
        query_gradients(model, layers, CausalLMTask(), split, progress=False)


# ----------------------------------------------------------------------------------------------------------
# 5. Accumulation dtype


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "int8"])
def test_low_precision_accumulation_is_refused(dtype):
    with pytest.raises(ValueError, match="model's precision is set on the model"):
        FactorArguments(dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# Unclear errors made clear


def test_zero_row_batch_is_refused():
    model = gpt_neox()
    layers = track_layers(model)
    empty = {k: v[:0] for k, v in token_batches(4)[0].items()}
    with pytest.raises(ValueError, match="fitting batch 1 has 0 rows"):
        fit_factors(model, layers, CausalLMTask(), token_batches(4) + [empty], FactorArguments(**ARGS))
    with pytest.raises(ValueError, match="query batch 0 has 0 rows"):
        query_gradients(model, layers, CausalLMTask(), [empty], progress=False)
    factors = fit_factors(model, layers, CausalLMTask(), token_batches(4), FactorArguments(**ARGS))
    q = precondition_queries(query_gradients(model, layers, CausalLMTask(), query_batches(), progress=False), factors)
    with pytest.raises(ValueError, match="training batch 0 has 0 rows"):
        compute_scores(model, layers, CausalLMTask(), [empty], q, args=ScoreArguments(progress=False))


def test_one_token_fitting_data_is_refused():
    model = gpt_neox()
    ids = torch.randint(0, VOCAB, (6, 1))
    batches = iterate_batches({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}, 3)
    with pytest.raises(ValueError, match="need|sequences of >= 2 tokens"):
        fit_factors(model, track_layers(model), CausalLMTask(), batches, FactorArguments(**ARGS))


def test_generator_of_batches_is_refused_up_front(monkeypatch):
    import influence_core.factors.passes as passes

    monkeypatch.setattr(passes, "covariance_pass", lambda *a: pytest.fail("a pass started"))
    model = gpt_neox()
    with pytest.raises(TypeError, match="one-shot iterator .* pass a list or a re-iterable"):
        fit_factors(model, track_layers(model), CausalLMTask(), (b for b in token_batches(4)), FactorArguments(**ARGS))


def test_batch_without_labels_is_a_clear_error():
    model = gpt_neox()
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in token_batches(4)]
    with pytest.raises(ValueError, match="the batch has no 'labels'"):
        fit_factors(model, track_layers(model), CausalLMTask(), batches, FactorArguments(**ARGS))


@pytest.mark.parametrize("field, value, error", [
    ("damping_factor", "abc", TypeError), ("damping", -1.0, ValueError), ("checkpoint_every", 1.5, TypeError),
    ("seed", "0", TypeError), ("damping_factor", float("nan"), ValueError)])
def test_factor_arguments_are_validated(field, value, error):
    with pytest.raises(error, match=field):
        FactorArguments(**{field: value})


@pytest.mark.parametrize("field, value, error", [
    ("per_token", "yes", TypeError), ("low_rank_chunk", 0, ValueError), ("dense_query_bytes", "1G", TypeError),
    ("low_rank", 1, TypeError)])
def test_score_arguments_are_validated(field, value, error):
    with pytest.raises(error, match=field):
        ScoreArguments(**{field: value})


@pytest.mark.parametrize("batch_size", [0, -1, 2.5])
def test_batch_size_below_one_is_refused(batch_size):
    with pytest.raises(ValueError, match=f"batch_size must be an integer >= 1, got {batch_size}"):
        iterate_batches({"input_ids": torch.zeros(4, 3, dtype=torch.long)}, batch_size)


@pytest.mark.parametrize("damaged", ["manifest.json", "factors.safetensors", "covariance.safetensors"])
def test_damaged_factor_files_are_named(tmp_path, damaged):
    model = gpt_neox()
    layers = track_layers(model)
    fit_factors(model, layers, CausalLMTask(), token_batches(4), FactorArguments(**ARGS), output_dir=tmp_path)
    path = tmp_path / damaged
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    if damaged == "covariance.safetensors":  # read on a rerun that has not finished the fit
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        manifest["stages_done"] = ["covariance"]
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match=f"{path}.* delete it and rerun to recompute"):
            fit_factors(model, layers, CausalLMTask(), token_batches(4), FactorArguments(**ARGS), output_dir=tmp_path)
        return
    with pytest.raises(ValueError, match=f"{path}.* delete it and rerun to recompute"):
        load_factors(tmp_path)


@pytest.fixture()
def shard_setup():
    model = gpt_neox()
    layers = track_layers(model)
    task = CausalLMTask()
    factors = fit_factors(model, layers, task, token_batches(8), FactorArguments(**ARGS))
    q = precondition_queries(query_gradients(model, layers, task, query_batches(), progress=False), factors)
    train = {k: torch.cat([b[k] for b in token_batches(6)]) for k in token_batches(6)[0]}
    return model, layers, task, q, train


def test_damaged_shard_is_recomputed_on_resume(tmp_path, shard_setup, capsys):
    from influence_core.sharding import ShardArguments

    model, layers, task, q, train = shard_setup
    names = ["q0", "q1", "q2"]
    shard_args = ShardArguments(shard_size=2, batch_size=2, top_k_tokens=0)
    score_args = ScoreArguments(progress=False)
    score_in_shards(model, layers, task, train, q, names, tmp_path, shard_args, score_args)
    complete = read_scores(tmp_path).sort_values(["query", "train_id"]).reset_index(drop=True)
    path = shard_path(tmp_path, 1)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"shard {path} is damaged.*rerun"):
        read_scores(tmp_path)
    score_in_shards(model, layers, task, train, q, names, tmp_path, shard_args, score_args)
    assert f"shard {path} is damaged" in capsys.readouterr().out
    again = read_scores(tmp_path).sort_values(["query", "train_id"]).reset_index(drop=True)
    assert again.equals(complete)


def test_truncated_shard_manifest_is_named(tmp_path, shard_setup):
    from influence_core.sharding import ShardArguments

    model, layers, task, q, train = shard_setup
    args = (ShardArguments(shard_size=3, batch_size=3, top_k_tokens=0), ScoreArguments(progress=False))
    score_in_shards(model, layers, task, train, q, ["q0", "q1", "q2"], tmp_path, *args)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(ValueError, match=f"{manifest} is damaged.*delete it and rerun"):
        read_scores(tmp_path)
    with pytest.raises(ValueError, match=f"{manifest} is damaged"):
        score_in_shards(model, layers, task, train, q, ["q0", "q1", "q2"], tmp_path, *args)


def test_empty_jsonl_is_a_clear_error(tmp_path):
    from experiments.loading import load_text_dataset

    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_text_dataset(tmp_path / "train.jsonl")


@pytest.mark.parametrize("name", ["artifacts/zoo/zoo_sx/model", "./mdl", "artifacts/mdl", "zoo_sx/model"])
def test_mistyped_relative_model_path_fails_at_once(tmp_path, monkeypatch, name):
    from experiments.loading import load_model_and_tokenizer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "artifacts").mkdir()  # "artifacts/mdl" is a path here, not the hub repo artifacts/mdl
    # "zoo_sx/model" could be a hub repo: without HF_HUB_OFFLINE=0 nothing is tried on the hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_tokenizer(name)
    assert time.perf_counter() - start < 5
