"""Loading models, tokenizers and datasets the Hugging Face way, with clear errors."""

import fnmatch
import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel
from zoo_fixtures import micro_zoo  # noqa: F401

from experiments.loading import load_model_and_tokenizer, load_text_dataset, model_max_length, tokenize_sequences

REPO = Path(__file__).resolve().parents[1]


def test_load_zoo_model_like_a_hub_model(micro_zoo):
    model, tokenizer = load_model_and_tokenizer(micro_zoo.model_path)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    ids = tokenizer("The capital of", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    assert model_max_length(model) == 256


def test_load_tiny_gpt2_saved_locally(micro_zoo, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(micro_zoo.tokenizer_path)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    gpt2.save_pretrained(tmp_path / "gpt2-tiny")
    tokenizer.save_pretrained(tmp_path / "gpt2-tiny")
    model, loaded_tokenizer = load_model_and_tokenizer(tmp_path / "gpt2-tiny")
    assert type(model).__name__ == "GPT2LMHeadModel"
    ids = torch.randint(0, len(tokenizer), (1, 10))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, gpt2(input_ids=ids).logits)
    names = [n for n, _ in model.named_modules()]
    assert "transformer.h.1.mlp.c_fc" in names and "transformer.h.1.mlp.c_proj" in names
    assert model_max_length(model) == 64


def test_missing_local_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_tokenizer(tmp_path / "no" / "such" / "model")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model_and_tokenizer(REPO, dtype="float13")


def test_missing_hub_model_mentions_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        load_model_and_tokenizer("influence-lab-test/no-such-model")


def test_load_saved_world_and_tokenize(micro_zoo):
    train = load_text_dataset(micro_zoo.dataset_path, split="train")
    assert {"doc_id", "family", "fact_ids"} <= set(train.column_names)
    tokenizer = AutoTokenizer.from_pretrained(micro_zoo.tokenizer_path)
    subset = train.select(range(5))
    batch = tokenize_sequences(subset, tokenizer, max_length=1024)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 5
    for row, text in enumerate(subset["text"]):
        n = int(batch["lengths"][row])
        assert tokenizer.decode(batch["input_ids"][row, :n]) == text
    with pytest.raises(ValueError, match="more than max_length=8"):
        tokenize_sequences(subset, tokenizer, max_length=8)
    assert tokenize_sequences(subset, tokenizer, max_length=8, truncation=True)["input_ids"].shape == (5, 8)
    with pytest.raises(KeyError, match="available splits"):
        load_text_dataset(micro_zoo.dataset_path, split="test")


def test_load_local_json_and_text_files(tmp_path):
    rows = [{"text": "one sequence"}, {"text": "another sequence"}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert list(load_text_dataset(tmp_path / "data.jsonl")["text"]) == ["one sequence", "another sequence"]
    with pytest.raises(KeyError, match="column 'content' not in"):
        load_text_dataset(tmp_path / "data.jsonl", text_column="content")
    (tmp_path / "lines.txt").write_text("first line\nsecond line\n")
    assert len(load_text_dataset(tmp_path / "lines.txt")) == 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_dataset(tmp_path / "missing" / "dir" / "data.jsonl")
    empty = tmp_path / "empty"
    empty.mkdir()
    import datasets

    datasets.Dataset.from_dict({"text": []}).to_parquet(str(empty / "data.parquet"))
    with pytest.raises(ValueError, match="is empty"):
        load_text_dataset(empty / "data.parquet")


def test_model_configs_name_modules_that_exist(micro_zoo):
    model = AutoModelForCausalLM.from_pretrained(micro_zoo.model_path)
    names = [n for n, _ in model.named_modules()]
    configs = sorted((REPO / "configs" / "model").glob("*.yaml"))
    stems = {p.stem for p in configs}
    assert {"zoo_xs", "zoo_s", "zoo_m", "zoo_l", "micro", "gpt2", "gpt2-medium"} <= stems
    assert {f"pythia-{s}" for s in ["70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b"]} <= stems
    for path in configs:
        cfg = yaml.safe_load(path.read_text())
        assert {"name_or_path", "family", "mlp_pattern", "mlp_modules", "max_length"} <= set(cfg), path
        if cfg["family"] == "gpt_neox":
            matched = [n for n in names if fnmatch.fnmatch(n, cfg["mlp_pattern"]) and n.rsplit(".", 1)[-1] in cfg["mlp_modules"]]
            assert len(matched) == 2 * model.config.num_hidden_layers, path
    for path in (REPO / "configs" / "data").glob("*.yaml"):
        assert {"path", "split", "text_column", "max_length"} <= set(yaml.safe_load(path.read_text()))
