"""What every study does with the engine: encode data, fit (or reuse) factors, score queries, save results.

model + training texts + queries --(influence config)--> InfluenceScores --> top-sequence tables and files.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from influence_core import (CausalLMTask, FactorArguments, InfluenceScores, Query, ScoreArguments, compute_scores,
                            encode_queries, fit_factors, iterate_batches, query_gradients, track_layers)
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


def factor_arguments(cfg: DictConfig) -> FactorArguments:
    """The influence config group -> FactorArguments (unknown keys in the group are Hydra's to refuse)."""
    return FactorArguments(strategy=cfg.strategy, damping_factor=cfg.damping_factor, damping=cfg.damping,
                           fisher=cfg.fisher, seed=cfg.seed, dtype=cfg.dtype, progress=cfg.progress)


def run_influence(model, tokenizer, train_encoded: dict[str, torch.Tensor], queries: Sequence[Query],
                  cfg: DictConfig, factors_dir: str | Path | None, data_fingerprint: str | None = None,
                  score_indices: Sequence[int] | None = None) -> InfluenceRun:
    """Fit (or reuse) factors on the first `cfg.num_fit_sequences` training sequences, then score every query
    against every training sequence, or only those at `score_indices`."""
    task = CausalLMTask()
    patterns = cfg.get("module_patterns")
    layers = track_layers(model, None if patterns is None else list(patterns))  # null: the family registry
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
                            [q.name for q in queries], ScoreArguments(per_token=cfg.per_token, progress=cfg.progress))
    timings["scores"] = time.perf_counter() - start
    return InfluenceRun(scores, scored["input_ids"], scored["attention_mask"], timings)


def single_token_dominance(token_scores: torch.Tensor) -> torch.Tensor:
    """||a||_2 / ||a||_1 of token-wise influences (..., T); above 2/3 one token dominates (paper Sec 5: spurious)."""
    return token_scores.norm(p=2, dim=-1) / token_scores.norm(p=1, dim=-1).clamp_min(1e-30)


def top_sequences_table(run: InfluenceRun, metadata: pd.DataFrame, tokenizer, k: int) -> pd.DataFrame:
    """Per query its k most positively influential training sequences, with metadata and their top tokens."""
    rows = []
    for q_index, query in enumerate(run.scores.query_names):
        for rank, (n, value) in enumerate(run.scores.top(q_index, k), start=1):
            row = {"query": query, "rank": rank, "train_index": n, "influence": value}
            row.update(metadata.iloc[n].to_dict())
            if run.scores.per_token is not None:
                length = int(run.train_attention_mask[n].sum())
                tokens = run.scores.per_token[q_index, n, :length]
                best = int(tokens.argmax())
                row["top_token"] = tokenizer.decode([int(run.train_input_ids[n, best])])
                row["top_token_share"] = float(tokens[best] / value) if value else float("nan")
                row["single_token_dominance"] = float(single_token_dominance(tokens))
            rows.append(row)
    return pd.DataFrame(rows)


def save_run(run: InfluenceRun, out_dir: Path, cfg: DictConfig, extra: dict | None = None) -> None:
    """scores.safetensors (total, per-layer, per-token) + manifest.json (resolved config, versions, timings)."""
    import transformers

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"total": run.scores.total, "per_layer": run.scores.per_layer}
    if run.scores.per_token is not None:
        tensors["per_token"] = run.scores.per_token
    save_file({k: v.contiguous().float() for k, v in tensors.items()}, str(out_dir / "scores.safetensors"))
    manifest = {"query_names": run.scores.query_names, "layer_names": run.scores.layer_names,
                "timings_s": {k: round(v, 3) for k, v in run.timings_s.items()},
                "config": OmegaConf.to_container(cfg, resolve=True),
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                             "python": platform.python_version()}, **(extra or {})}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))


def config_digest(cfg: DictConfig) -> str:
    """A short hash of a config section, to name cache folders by what produced them."""
    return hashlib.sha256(json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True).encode()).hexdigest()[:10]
