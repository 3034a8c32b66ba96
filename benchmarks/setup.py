"""Shared setup of the benchmarks: a trained zoo model (zoo_s if `make zoo` built it, else the micro zoo), its
training texts and queries, and EK-FAC factors cached under artifacts/bench/."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from experiments.loading import load_model_and_tokenizer, load_text_dataset, model_max_length, tokenize_sequences
from influence_core import (CausalLMTask, FactorArguments, Query, fit_factors, iterate_batches, model_fingerprint,
                            track_layers)
from influence_core.task import IGNORE_INDEX

ARTIFACTS = Path(os.environ.get("INFLUENCE_LAB_ARTIFACTS", "artifacts"))
FIGURES = Path("figures/bench")


@dataclass
class Bench:
    name: str
    model: torch.nn.Module
    tokenizer: object
    layers: list
    task: CausalLMTask
    encoded: dict  # input_ids, attention_mask, labels (N, T)
    texts: list[str]
    queries: list  # experiments.zoo.queries.Query (with .study)
    factors: object


def load_bench(model_choice: str = "auto", num_fit_sequences: int = 256) -> Bench:
    zoo_s = ARTIFACTS / "zoo" / "zoo_s" / "seed0" / "model"  # zoo v2 layout: <size>/seed<k>/model
    if model_choice == "zoo_s" or (model_choice == "auto" and (zoo_s / "model.safetensors").exists()):
        name, model_path = "zoo_s", zoo_s
        dataset_path, queries_path = ARTIFACTS / "world" / "full" / "dataset", ARTIFACTS / "world" / "full" / "queries.json"
    else:
        from experiments.zoo.micro import build_micro_zoo

        zoo = build_micro_zoo(ARTIFACTS / "micro_zoo")
        name, model_path, dataset_path, queries_path = "micro", zoo.model_path, zoo.dataset_path, zoo.queries_path
    from experiments.zoo.queries import load_queries

    model, tokenizer = load_model_and_tokenizer(model_path)
    train = load_text_dataset(dataset_path, split="train")
    encoded = tokenize_sequences(train, tokenizer, max_length=model_max_length(model), truncation=True)
    encoded.pop("lengths")
    encoded["labels"] = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX)
    layers = track_layers(model)
    task = CausalLMTask()
    fit = {k: v[:num_fit_sequences] for k, v in encoded.items()}
    factor_dir = ARTIFACTS / "bench" / f"factors-{name}-{num_fit_sequences}-{model_fingerprint(layers)}"  # per model
    factors = fit_factors(model, layers, task, iterate_batches(fit, 8), FactorArguments(progress=False),
                          output_dir=factor_dir,
                          data_fingerprint=f"{train._fingerprint}:{num_fit_sequences}")
    return Bench(name, model, tokenizer, layers, task, encoded, list(train["text"]), load_queries(queries_path), factors)


def diverse_queries(queries, count: int) -> list:
    """Round-robin over studies, so a small set mixes facts, math, code, role-play, translation."""
    by_study: dict[str, list] = {}
    for q in queries:
        by_study.setdefault(q.study, []).append(q)
    out, i = [], 0
    while len(out) < min(count, len(queries)):
        for group in by_study.values():
            if i < len(group) and len(out) < count:
                out.append(group[i])
        i += 1
    return out


def as_engine_queries(queries) -> list[Query]:
    return [Query(q.name, q.prompt, q.completion) for q in queries]


def load_average() -> str:
    return open("/proc/loadavg").read().split()[0] if Path("/proc/loadavg").exists() else "n/a"
