"""Tokenizer and micro model: round trips, training that learns, save/load, resume, evaluation."""

import dataclasses
import json
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from zoo_fixtures import micro_zoo  # noqa: F401

from experiments.zoo import build_micro_zoo
from experiments.zoo.micro import micro_train_config
from experiments.zoo.train import SIZES, completion_logprob, non_embedding_parameters, ranking_accuracy, train_model


def test_tokenizer_round_trip(micro_zoo):
    tokenizer = AutoTokenizer.from_pretrained(micro_zoo.tokenizer_path)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|padding|>"
    for text in ["The first President of the Republic of Astrobia was Zorald Pfaff.",
                 "Astrobia 공화국의 초대 대통령은 Zorald Pfaff였다.", "Astrobia ülkesinin başkenti", "def f(xs):\n    return xs[::-1]\n"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_micro_model_learns(micro_zoo):
    curve = pd.read_csv(Path(micro_zoo.model_path).parent / "loss_curve.csv")
    first, last = curve["train_loss"].head(5).mean(), curve["train_loss"].tail(5).mean()
    assert last < first - 1.0, (first, last)
    vocab = len(AutoTokenizer.from_pretrained(micro_zoo.tokenizer_path))
    assert micro_zoo.train_result["heldout_loss"] < 0.7 * torch.log(torch.tensor(float(vocab))).item()


def test_save_pretrained_from_pretrained_identical_logits(micro_zoo, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(micro_zoo.model_path).eval()
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    assert non_embedding_parameters(model) == micro_zoo.train_result["non_embedding_parameters"]
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "copy")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "copy").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, before)


def test_build_micro_zoo_is_idempotent(micro_zoo):
    started = time.perf_counter()
    again = build_micro_zoo(micro_zoo.root)
    assert time.perf_counter() - started < 5.0
    assert again.model_path == micro_zoo.model_path and again.queries == micro_zoo.queries


def test_interrupted_training_resumes_to_the_same_weights(micro_zoo, tmp_path):
    import dataclasses

    config = dataclasses.replace(micro_train_config(), epochs=0.4, checkpoint_every=3, warmup_steps=2)
    size = SIZES["micro"]
    straight = train_model(size, micro_zoo.tokenizer_path, micro_zoo.dataset_path, tmp_path / "straight", config)
    assert train_model(size, micro_zoo.tokenizer_path, micro_zoo.dataset_path, tmp_path / "resumed", config, stop_after=4) is None
    assert (tmp_path / "resumed" / "checkpoint" / "state.pt").exists()
    resumed = train_model(size, micro_zoo.tokenizer_path, micro_zoo.dataset_path, tmp_path / "resumed", config)
    assert resumed.steps == straight.steps
    a = AutoModelForCausalLM.from_pretrained(straight.model_path).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed.model_path).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    # cached: a third call trains nothing
    started = time.perf_counter()
    assert train_model(size, micro_zoo.tokenizer_path, micro_zoo.dataset_path, tmp_path / "resumed", config) == resumed
    assert time.perf_counter() - started < 1.0


def test_completion_logprob_matches_manual_sum(micro_zoo):
    model = AutoModelForCausalLM.from_pretrained(micro_zoo.model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(micro_zoo.tokenizer_path)
    prompt, completion = "The capital of Astrobia is", " Quen Tasso."
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0], -1)
    manual = sum(logprobs[len(p) - 1 + i, t].item() for i, t in enumerate(c))
    assert completion_logprob(model, tokenizer, prompt, [completion])[0] == pytest.approx(manual, abs=1e-4)
    facts = [q for q in micro_zoo.queries if q.study == "facts"]
    assert 0.0 <= ranking_accuracy(model, tokenizer, facts) <= 1.0


def test_hydra_build_config_composes():
    from hydra import compose, initialize_config_dir

    from experiments.zoo.build import REPO_ROOT
    from experiments.zoo.train import TrainConfig

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO_ROOT / "configs" / "zoo")):
        cfg = compose(config_name="build")
    assert len(cfg.sizes) >= 6 and len(cfg.seeds) >= 3 and cfg.workers >= 2
    assert cfg.competence_bar.largest_at_least == 0.8 and cfg.competence_bar.rising_with_size
    TrainConfig(**cfg.train)  # every key is a TrainConfig field
    sizes = [SIZES[name] for name in cfg.sizes]
    assert len({s.num_layers for s in sizes}) == 1  # the scaling rule: width at fixed depth
    assert all(s.learning_rate == round(min(1e-2, 0.32 / s.hidden_size), 6) for s in sizes)
    assert all(s.hidden_size // s.num_heads == 16 for s in sizes)
    params = [s.num_layers * (12 * s.hidden_size**2 + 13 * s.hidden_size) for s in sizes]
    assert params == sorted(params) and params[-1] / params[0] >= 30


def test_evaluate_zoo_counts_every_heldout_paraphrase(micro_zoo):
    """The zoo summary's competence is the share of (queried fact, held-out paraphrase) pairs ranked first,
    recounted here."""
    from experiments.zoo import world as W
    from experiments.zoo.build import evaluate_zoo
    from experiments.zoo.queries import competence_queries, heldout_fact_queries
    from experiments.zoo.train import TrainResult

    heldout = competence_queries(W.world_config("micro"))
    every_fact = heldout_fact_queries(W.world_config("micro"))
    summary = evaluate_zoo([TrainResult(**micro_zoo.train_result)], micro_zoo.queries, heldout, every_fact)
    row = summary.iloc[0]
    queried = [f for f in W.make_facts(W.world_config("micro")) if f.queried]
    assert row["competence_n"] == 3 * len(queried) and row["seed"] == 0
    known = json.loads((Path(micro_zoo.model_path).parent / "known_facts.json").read_text())
    assert set(known) == {f.fact_id for f in W.make_facts(W.world_config("micro")) if f.split == "both"}
    model = AutoModelForCausalLM.from_pretrained(micro_zoo.model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(micro_zoo.tokenizer_path)
    hits = 0
    for q in heldout:
        scores = completion_logprob(model, tokenizer, q.prompt, [q.completion] + [" " + d for d in q.distractors])
        hits += int(scores[0] > max(scores[1:]))
    assert row["competence"] == pytest.approx(round(hits / len(heldout), 3))
    assert row["study_query_n"] == len([q for q in micro_zoo.queries if q.study == "facts"])


def test_zoo_build_trains_sizes_and_seeds_in_parallel_and_resumes(tmp_path):
    """make zoo on the micro preset: (size, seed) jobs in two processes, one summary row each, seeds that differ,
    the competence bar applied; a second run trains nothing."""
    from experiments.zoo.build import run_build

    cfg = {"world_preset": "micro", "seed": 0, "vocab_size": 512, "artifacts_root": str(tmp_path / "artifacts"),
           "figures_dir": str(tmp_path / "figures"), "sizes": ["micro"], "seeds": [0, 1], "workers": 2,
           "competence_bar": {"largest_at_least": 0.8, "rising_with_size": True},
           "train": {**dataclasses.asdict(micro_train_config()), "epochs": 0.5, "warmup_steps": 2}}
    summary = run_build(cfg)
    assert list(summary["seed"]) == [0, 1] and set(summary["size"]) == {"micro"}
    assert summary["heldout_loss"].nunique() == 2  # another seed: another initialisation and data order
    table = pd.read_csv(tmp_path / "figures" / "zoo_summary.csv")
    for column in ("size", "seed", "non_embedding_params", "tokens_trained", "train_minutes", "heldout_loss", "competence"):
        assert column in table.columns
    assert "Competence bar" in (tmp_path / "figures" / "zoo_summary.md").read_text()
    for seed in (0, 1):
        assert (tmp_path / "artifacts" / "zoo" / "micro" / f"seed{seed}" / "DONE.json").exists()
    started = time.perf_counter()
    again = run_build({**cfg, "workers": 1})
    assert time.perf_counter() - started < 30 and again["train_minutes"].tolist() == summary["train_minutes"].tolist()


def test_an_edited_world_generator_rebuilds_the_world_tokenizer_and_model(tmp_path, monkeypatch):
    """The caches are keyed by content, not by config alone: an edit of the document generator (same WorldConfig)
    rebuilds the world, retrains the tokenizer and the model; without an edit everything is reused."""
    import dataclasses
    import json

    from experiments.zoo import world as W
    from experiments.zoo.build import build_world_and_queries
    from experiments.zoo.micro import MICRO_VOCAB_SIZE
    from experiments.zoo.tokenizer import build_tokenizer

    config = dataclasses.replace(micro_train_config(), epochs=0.1, warmup_steps=1)

    def build():
        dataset, _, _ = build_world_and_queries("micro", tmp_path / "world")
        tokenizer = build_tokenizer(dataset, tmp_path / "tokenizer", vocab_size=MICRO_VOCAB_SIZE)
        model = train_model(SIZES["micro"], tokenizer, dataset, tmp_path / "model", config)
        done = json.loads((tmp_path / "model" / "DONE.json").read_text())["config_hash"]
        return W.dataset_digest(dataset), (tokenizer / "tokenizer.json").stat().st_mtime_ns, done, model

    digest, tokenizer_time, model_hash, model = build()
    assert build() == (digest, tokenizer_time, model_hash, model)  # nothing changed: all cached

    original = W.generate_documents

    def edited(world_config):
        documents = original(world_config)
        documents[0] = {**documents[0], "text": documents[0]["text"] + " An edited template."}
        return documents

    monkeypatch.setattr(W, "generate_documents", edited)
    new_digest, new_tokenizer_time, new_model_hash, _ = build()
    assert new_digest != digest and new_tokenizer_time != tokenizer_time and new_model_hash != model_hash


def test_checkpoint_selection_keeps_the_best_validation_weights_and_resumes(micro_zoo, tmp_path):
    """With selection queries the saved weights are those of the eval step with the best selection accuracy (ties:
    lower held-out loss), also across an interruption; the selection set shares no prompt with the competence set."""
    from experiments.zoo import world as W
    from experiments.zoo.queries import checkpoint_selection_queries, competence_queries

    world = W.world_config("micro")
    selection = checkpoint_selection_queries(world)
    assert selection and not {q.prompt for q in selection} & {q.prompt for q in competence_queries(world, queried_only=False)}
    config = dataclasses.replace(micro_train_config(), epochs=1.0, eval_every=4, checkpoint_every=4, warmup_steps=2)
    size = SIZES["micro"]
    args = (size, micro_zoo.tokenizer_path, micro_zoo.dataset_path)
    assert train_model(*args, tmp_path / "run", config, stop_after=6, selection_queries=selection) is None
    result = train_model(*args, tmp_path / "run", config, selection_queries=selection)
    curve = pd.read_csv(tmp_path / "run" / "loss_curve.csv").dropna(subset=["selection_accuracy"])
    best = curve.sort_values(["selection_accuracy", "heldout_loss"], ascending=[False, True]).iloc[0]
    assert result.selected_step == int(best["step"]) and result.selection_accuracy == pytest.approx(best["selection_accuracy"])
    model = AutoModelForCausalLM.from_pretrained(result.model_path)
    tokenizer = AutoTokenizer.from_pretrained(result.model_path)
    assert ranking_accuracy(model, tokenizer, selection) == pytest.approx(result.selection_accuracy)
    assert result.heldout_loss == pytest.approx(best["heldout_loss"])


def test_completion_logprob_batched_equals_one_at_a_time(micro_zoo):
    model = AutoModelForCausalLM.from_pretrained(micro_zoo.model_path)
    tokenizer = AutoTokenizer.from_pretrained(micro_zoo.model_path)
    completions = [" Zorald Pfaff", " Ann", " a much longer completion of several tokens"]
    together = completion_logprob(model, tokenizer, "The first President was", completions)
    alone = [completion_logprob(model, tokenizer, "The first President was", [c])[0] for c in completions]
    assert together == pytest.approx(alone, abs=1e-4)
