"""In-memory scoring of a model that exists only in this process (the word-order fine-tuning extension) and the
InfluenceRun the studies read; everything on disk goes through experiments/pipeline.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig

from experiments.pipeline import factor_arguments, influence_layers
from influence_core import (CausalLMTask, InfluenceScores, Query, ScoreArguments, compute_scores, encode_queries,
                            fit_factors, iterate_batches, query_gradients)
from influence_core.task import IGNORE_INDEX


@dataclass
class InfluenceRun:
    """Scores of a query set over a training set, with the token ids they refer to and the time each stage took."""

    scores: InfluenceScores
    train_input_ids: torch.Tensor  # (N, T), right-padded
    train_attention_mask: torch.Tensor  # (N, T)
    timings_s: dict[str, float] = field(default_factory=dict)


def training_batches(encoded: dict[str, torch.Tensor], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Tokenized training sequences -> batches whose labels are the tokens themselves (padding ignored)."""
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX)
    return iterate_batches({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                            "labels": labels}, batch_size)


def run_influence(model, tokenizer, train_encoded: dict[str, torch.Tensor], queries: Sequence[Query],
                  cfg: DictConfig, factors_dir: str | Path | None, data_fingerprint: str | None = None,
                  score_indices: Sequence[int] | None = None) -> InfluenceRun:
    """Fit (or reuse) factors on the first `cfg.num_fit_sequences` training sequences, then score every query
    against every training sequence, or only those at `score_indices`."""
    task = CausalLMTask()
    layers = influence_layers(model, cfg)
    timings = {}
    fit_count = cfg.num_fit_sequences or len(train_encoded["input_ids"])
    fit_encoded = {k: v[:fit_count] for k, v in train_encoded.items()}
    start = time.perf_counter()
    factors = fit_factors(model, layers, task, training_batches(fit_encoded, cfg.fit_batch_size), factor_arguments(cfg),
                          output_dir=factors_dir, data_fingerprint=f"{data_fingerprint}:{fit_count}")
    timings["factors"] = time.perf_counter() - start

    start = time.perf_counter()
    encoded_queries = encode_queries(tokenizer, queries, max_length=cfg.get("max_length"))
    preconditioned = query_gradients(model, layers, task, iterate_batches(encoded_queries, cfg.query_batch_size),
                                     progress=cfg.progress, factors=factors)
    timings["queries"] = time.perf_counter() - start

    start = time.perf_counter()
    scored = train_encoded if score_indices is None else {k: v[list(score_indices)] for k, v in train_encoded.items()}
    scores = compute_scores(model, layers, task, training_batches(scored, cfg.score_batch_size), preconditioned,
                            [q.name for q in queries], ScoreArguments(per_token=cfg.per_token, progress=cfg.progress,
                                                                          output_blocks=cfg.output_blocks))
    timings["scores"] = time.perf_counter() - start
    return InfluenceRun(scores, scored["input_ids"], scored["attention_mask"], timings)
