"""The LDS benchmark's setup: a base model, a fine-tuning set, queries, and the model fine-tuned on the full set.

Default (`source: plain_licences`): Debian's licence texts (experiments/plain.py) cut into chunks of `chunk_words`
words and shuffled; the first `pretrain_sequences` chunks train the base model (plain GPT-2 from a config, tokenizer
and all), the next `num_train` are the fine-tuning set, and `num_queries` held-out chunks become queries
(prompt: the first `prompt_words` words; completion: the next `completion_words`). `source: files`: any causal LM
directory (`base_model`) with a jsonl of fine-tuning texts (`train_file`, {"text": ...}) and a query file
(`queries_file`, {name, prompt, completion}). Either way the base model is fine-tuned on the whole set by the
recipe (seed 0), the model whose influence is estimated; the subsets' retrains start from the base.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from influence_core import IGNORE_INDEX, Query, encode_queries

from .finetune import Recipe, fine_tune


@dataclass
class LDSSetup:
    name: str
    base_dir: Path  # the model every retrain starts from
    tuned_dir: Path  # the base fine-tuned on the whole set: influence is estimated here
    texts: list[str]  # the fine-tuning set
    data: dict[str, torch.Tensor]  # input_ids, attention_mask, labels (N, T)
    queries: dict[str, torch.Tensor]  # encoded queries (Q, T'), labels on the completion only
    query_names: list[str]
    query_texts: list[str]  # prompt + completion (BM25)
    base_record: dict  # how the base model was made


def licence_chunks(chunk_words: int, seed: int) -> list[str]:
    from experiments.plain import licence_texts

    chunks = []
    for text in licence_texts().values():
        words = text.split()
        chunks += [" ".join(words[i : i + chunk_words]) for i in range(0, len(words), chunk_words)]
    chunks = [c for c in chunks if len(c.split()) == chunk_words]  # whole chunks only (no stubs)
    random.Random(seed).shuffle(chunks)
    return chunks


def plain_licence_inputs(cfg: DictConfig, out_dir: Path) -> tuple[Path, list[str], list[Query], dict]:
    """Base model (trained here, cached), fine-tuning texts and queries from the licence chunks."""
    from experiments.plain import PlainSettings, build_model

    chunks = licence_chunks(cfg.chunk_words, cfg.seed)
    need = cfg.pretrain_sequences + cfg.num_train + cfg.num_queries
    if need > len(chunks):
        raise ValueError(f"pretrain_sequences + num_train + num_queries = {need} exceeds the {len(chunks)} licence "
                         f"chunks of {cfg.chunk_words} words; lower one of them or chunk_words")
    pretrain = chunks[: cfg.pretrain_sequences]
    train = chunks[cfg.pretrain_sequences : cfg.pretrain_sequences + cfg.num_train]
    held_out = chunks[cfg.pretrain_sequences + cfg.num_train : need]
    queries = []
    for i, chunk in enumerate(held_out):
        words = chunk.split()
        queries.append(Query(f"licence_{i:02d}", " ".join(words[: cfg.prompt_words]),
                             " " + " ".join(words[cfg.prompt_words : cfg.prompt_words + cfg.completion_words])))
    base_dir = out_dir / "base"
    base_dir.mkdir(parents=True, exist_ok=True)
    (base_dir / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in pretrain))
    settings = PlainSettings(**cfg.base)
    model_dir = build_model("gpt2", base_dir, settings)
    return model_dir, train, queries, {"source": "plain_licences", "pretrain_sequences": len(pretrain),
                                       **asdict(settings)}


def file_inputs(cfg: DictConfig) -> tuple[Path, list[str], list[Query], dict]:
    from experiments.queries import load_query_file

    texts = [json.loads(line)["text"] for line in Path(cfg.train_file).read_text().splitlines() if line.strip()]
    texts = texts[: cfg.num_train] if cfg.num_train else texts
    queries = [Query(q.name, q.prompt, q.completion) for q in load_query_file(cfg.queries_file)][: cfg.num_queries]
    return Path(cfg.base_model), texts, queries, {"source": "files", "base_model": str(cfg.base_model)}


def encode_texts(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels (= input_ids, -100 at padding), right-padded, truncated to max_length."""
    from experiments.loading import tokenize_sequences

    encoded = tokenize_sequences(texts, tokenizer, max_length=max_length, truncation=True)
    encoded.pop("lengths")
    encoded["labels"] = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX)
    return encoded


def build_setup(cfg: DictConfig, recipe: Recipe, artifacts: Path) -> LDSSetup:
    """The configured setup, the full-set fine-tune cached under artifacts/lds/<name>/tuned."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(artifacts) / "lds" / cfg.name
    if cfg.source == "plain_licences":
        base_dir, texts, queries, record = plain_licence_inputs(cfg, out_dir)
    elif cfg.source == "files":
        base_dir, texts, queries, record = file_inputs(cfg)
    else:
        raise ValueError(f"setup.source={cfg.source!r}: use plain_licences or files")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = encode_texts(tokenizer, texts, cfg.max_length)
    encoded_queries = encode_queries(tokenizer, queries)
    tuned_dir = out_dir / "tuned"
    stamp = {"recipe": asdict(recipe), "base": record, "num_train": len(texts), "max_length": cfg.max_length,
             "first_text": texts[0][:80]}
    if not ((tuned_dir / "lds.json").exists() and json.loads((tuned_dir / "lds.json").read_text()) == stamp):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        fine_tune(model, data, range(len(texts)), recipe, seed=0)
        model.save_pretrained(tuned_dir)
        tokenizer.save_pretrained(tuned_dir)
        (tuned_dir / "lds.json").write_text(json.dumps(stamp, indent=1))
    return LDSSetup(cfg.name, Path(base_dir), tuned_dir, texts, data, encoded_queries, [q.name for q in queries],
                    [q.prompt + q.completion for q in queries], record)
