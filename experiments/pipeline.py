"""One path for every run, `score` and the studies alike:

    model + corpus + queries -> EK-FAC factors (cached) -> preconditioned queries (rank r) ->
    optional BM25 candidates -> resumable score shards (cached; torchrun: shard i on rank i mod N) ->
    token scores of each query's top_k_tokens sequences (cached per k beside the shards) -> score tables

Caches live under `artifacts/` and are named by `cache_key` over everything that determines them: factors by
the model's weights, the corpus and the numerical influence settings; shards by those and the queries' text
and the scoring settings except top_k_tokens, so every study on the same model and queries reads the same dense
shards whatever its top_k_tokens, and another k costs only the token pass over its top sequences
(influence_core/sharding.py). A rerun reuses them; a killed run resumes at the first missing factor stage, shard
or token part.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from experiments.loading import load_model_and_tokenizer, load_text_dataset, model_max_length, tokenize_sequences
from experiments.queries import Query
from experiments.results import CorpusRecord, ModelRecord
from influence_core import (CausalLMTask, FactorArguments, InfluenceScores, ScoreArguments, compute_scores,
                            encode_queries,
                            fit_factors, iterate_batches, model_fingerprint, query_gradients, track_layers)
from influence_core import Query as EngineQuery
from influence_core.sharding import ShardArguments, read_scores, score_in_shards, token_folder
from influence_core.task import IGNORE_INDEX
from influence_core.tfidf import tfidf_candidates
from influence_core.tracking import share_inputs

SPURIOUS_DOMINANCE = 2 / 3  # paper Sec 5: ||a||_2 / ||a||_1 of token-wise influences above this: one token dominates


def cache_key(parts: dict) -> str:
    """The one cache-key function: a short hash of everything that determines a cached artifact."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ---- settings ------------------------------------------------------------------------------------------------------

AUTO_LAYERS = "auto"  # influence.module_patterns: the family registry's MLP layers
INTEGER_SETTINGS = {"fit_batch_size": 1, "query_batch_size": 1, "score_batch_size": 1, "seed": 0}


def check_influence_settings(influence: DictConfig) -> None:
    """Refuse bad influence values before anything is loaded: one line naming the key, the value and the fix."""
    for key, minimum in INTEGER_SETTINGS.items():
        value = influence.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"influence.{key}={value!r}: give an integer >= {minimum}")
    factor = influence.get("damping_factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0:
        raise ValueError(f"influence.damping_factor={factor!r}: give a number > 0 (paper: 0.1)")
    damping = influence.get("damping")
    if damping is not None and (not isinstance(damping, (int, float)) or isinstance(damping, bool) or damping < 0):
        raise ValueError(f"influence.damping={damping!r}: give a number >= 0, or null for damping_factor x mean eigenvalue")
    blocks = influence.get("output_blocks")
    if blocks is not None and (not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1):
        raise ValueError(f"influence.output_blocks={blocks!r}: give an integer >= 1 dividing every tracked layer's "
                         "output width, or null for the whole gradient covariance")
    for key, computed in (("covariance_fraction", "the covariances are"),
                          ("correction_fraction", "the eigenvalue correction is")):
        fraction = influence.get(key)
        if fraction is not None and (not isinstance(fraction, (int, float)) or isinstance(fraction, bool)
                                     or not 0 < fraction <= 1):
            raise ValueError(f"influence.{key}={fraction!r}: give a number in (0, 1] (the share of the fitting "
                             f"batches {computed} computed from), or null for all of them")
    cache = influence.get("token_cache_bytes", 0)
    if not isinstance(cache, int) or isinstance(cache, bool) or cache < 0:
        raise ValueError(f"influence.token_cache_bytes={cache!r}: give an integer >= 0 (bytes of per-token activations "
                         "and pseudo-gradients kept for a one-pass fit), or 0 for two passes")
    fit = influence.get("num_fit_sequences")
    if fit is not None and (not isinstance(fit, int) or isinstance(fit, bool) or fit < 1):
        raise ValueError(f"influence.num_fit_sequences={fit!r}: give an integer >= 1, or null for all sequences")
    groups = influence.get("share_inputs")
    if groups is not None and (isinstance(groups, str) or not all(
            not isinstance(g, str) and len(g) >= 2 and all(isinstance(n, str) for n in g) for g in groups)):
        raise ValueError(f"influence.share_inputs={groups!r}: give null or a list of groups of layer-name suffixes "
                         "that read one input, e.g. [[gate_proj, up_proj]]")
    patterns = influence.get("module_patterns")
    if patterns != AUTO_LAYERS and (not patterns or isinstance(patterns, str)):
        raise ValueError(f"influence.module_patterns={patterns!r}: give '{AUTO_LAYERS}' for the model family's MLP "
                         "layers (influence_core.families) or a list of module-path globs, e.g. ['*mlp*']")


def influence_layers(model, influence: DictConfig):
    """The tracked layers: with module_patterns 'auto' the family registry's MLP layers, else the modules matching
    the listed globs."""
    patterns = influence.module_patterns
    layers = track_layers(model) if patterns == AUTO_LAYERS else track_layers(model, list(patterns))
    groups = influence.get("share_inputs")
    return share_inputs(layers, [list(g) for g in groups]) if groups else layers


@dataclass
class ScoringSettings:
    """How scores are computed and stored (beyond the factors): query rank, shards, token scores, BM25 filter."""

    query_rank: int | None = 32  # rank of each layer's preconditioned query (paper: 32); None: full rank
    shard_size: int = 256  # training sequences per shard file
    top_k_tokens: int = 10  # token-wise influence for each query's top k sequences (not in the shards' cache key)
    tfidf_top_k: int | None = None  # None: score every sequence; k: each query's k best BM25 matches (paper: 10,000)
    tfidf_k1: float = 1.5  # paper
    tfidf_b: float = 0.75  # not stated in the paper; Okapi's usual value
    fit_checkpoint_every: int = 25  # save a factor pass's running sums every K batches

    def __post_init__(self) -> None:
        checks = {"query_rank": (self.query_rank, 1, True), "shard_size": (self.shard_size, 1, False),
                  "top_k_tokens": (self.top_k_tokens, 0, False), "tfidf.top_k": (self.tfidf_top_k, 1, True),
                  "fit_checkpoint_every": (self.fit_checkpoint_every, 0, False)}
        for key, (value, minimum, nullable) in checks.items():
            if value is None and nullable:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{key}={value!r}: give an integer >= {minimum}" + (" or null" if nullable else ""))
        for key, value in {"tfidf.k1": self.tfidf_k1, "tfidf.b": self.tfidf_b}.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key}={value!r}: give a number >= 0")

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "ScoringSettings":
        tfidf = cfg.get("tfidf") or {}
        return cls(query_rank=cfg.get("query_rank"), shard_size=cfg.get("shard_size", 256),
                   top_k_tokens=cfg.get("top_k_tokens", 10), tfidf_top_k=tfidf.get("top_k"),
                   tfidf_k1=tfidf.get("k1", 1.5), tfidf_b=tfidf.get("b", 0.75),
                   fit_checkpoint_every=cfg.get("fit_checkpoint_every", 25))


def factor_arguments(influence: DictConfig) -> FactorArguments:
    """The influence config group -> FactorArguments (unknown keys in the group are Hydra's to refuse)."""
    return FactorArguments(strategy=influence.strategy, damping_factor=influence.damping_factor,
                           damping=influence.damping, fisher=influence.fisher, seed=influence.seed,
                           dtype=influence.dtype, progress=influence.progress, output_blocks=influence.output_blocks,
                           covariance_fraction=influence.get("covariance_fraction"),
                           token_cache_bytes=influence.get("token_cache_bytes", 0),
                           correction_fraction=influence.get("correction_fraction"))


UNKEYED_DEFAULTS = {"covariance_fraction": None, "token_cache_bytes": 0, "correction_fraction": None}


def numerical_settings(influence: DictConfig) -> dict:
    """The influence settings that change the numbers: cache keys must not depend on e.g. progress bars. Settings
    at the value they had before their key existed (UNKEYED_DEFAULTS) are left out, so older caches keep their names."""
    settings = OmegaConf.to_container(influence, resolve=True)
    return {k: v for k, v in settings.items()
            if k != "progress" and not (k in UNKEYED_DEFAULTS and v == UNKEYED_DEFAULTS[k])}


# ---- inputs --------------------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A causal LM and its tokenizer, with what identifies it (its weights' fingerprint)."""

    name: str
    path: str
    model: torch.nn.Module
    tokenizer: object
    fingerprint: str
    seed: int | None = None

    def record(self) -> ModelRecord:
        return ModelRecord(self.name, self.path, type(self.model).__name__, non_embedding_parameters(self.model),
                           self.seed)


def load_model(name: str, path: str | Path, dtype: str = "float32", device: str = "cpu",
               seed: int | None = None) -> LoadedModel:
    model, tokenizer = load_model_and_tokenizer(path, dtype=dtype, device=device)
    return LoadedModel(name, str(path), model, tokenizer, model_fingerprint(track_layers(model, ["*"])), seed)


def non_embedding_parameters(model: torch.nn.Module) -> int:
    """Parameters outside the input embeddings and the output head (the paper's model-size measure)."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings |= {id(p) for p in head.parameters()} if head is not None else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


@dataclass
class Corpus:
    """Training sequences as loaded and tokenized; `metadata` holds every column but the text (possibly none)."""

    path: str
    split: str
    text_column: str
    texts: list[str]
    metadata: pd.DataFrame
    encoded: dict[str, torch.Tensor]  # input_ids, attention_mask, labels (N, T), right-padded; labels -100 at padding
    fingerprint: str
    truncated: int = 0  # sequences cut to max_length (only with truncation=True)

    def __len__(self) -> int:
        return len(self.texts)

    def record(self) -> CorpusRecord:
        return CorpusRecord(self.path, self.fingerprint, [self.text_column, *self.metadata.columns], len(self))

    def subset(self, rows: Sequence[int]) -> "Corpus":
        """These rows as they were tokenized (truncated where the corpus was), to score again on their own."""
        rows = list(rows)
        index = torch.as_tensor(rows, dtype=torch.long)
        encoded = {k: v[index] for k, v in self.encoded.items()}
        width = int(encoded["attention_mask"].sum(1).max())
        return Corpus(self.path, self.split, self.text_column, [self.texts[i] for i in rows],
                      self.metadata.iloc[rows].reset_index(drop=True) if len(self.metadata.columns) else
                      pd.DataFrame(index=range(len(rows))), {k: v[:, :width] for k, v in encoded.items()},
                      cache_key({"corpus": self.fingerprint, "rows": rows}), self.truncated)


def load_corpus(path: str | Path, tokenizer, max_length: int, split: str = "train", text_column: str = "text",
                truncation: bool = False) -> Corpus:
    """A text corpus (jsonl, json, parquet, csv, txt, save_to_disk folder) with only a text column required.

    Sequences longer than max_length are refused (naming the first and the count) unless truncation=True, in
    which case they are cut and the count is printed.
    """
    dataset = load_text_dataset(path, split=split, text_column=text_column)
    encoded = tokenize_sequences(dataset, tokenizer, max_length=max_length, text_column=text_column,
                                 truncation=truncation)
    lengths = encoded.pop("lengths")
    full = torch.tensor([len(ids) for ids in tokenizer(list(dataset[text_column]), add_special_tokens=False)["input_ids"]])
    truncated = int((full > lengths).sum())
    if truncated:
        print(f"corpus: {truncated} of {len(dataset)} sequences truncated to {max_length} tokens (truncation=true)")
    encoded["labels"] = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX)
    metadata = dataset.remove_columns([text_column]).to_pandas()
    fingerprint = cache_key({"dataset": dataset._fingerprint, "max_length": max_length, "truncation": truncation})
    return Corpus(str(path), split, text_column, list(dataset[text_column]), metadata, encoded, fingerprint, truncated)


def corpus_from_texts(texts: Sequence[str], tokenizer, max_length: int, name: str,
                      metadata: pd.DataFrame | None = None, truncation: bool = False) -> Corpus:
    """Sequences that are not a file on disk (probe sequences, translations, a fine-tuning set) as a Corpus to
    score; over-long texts are refused (naming the first) unless truncation=True (the count is printed)."""
    texts = list(texts)
    encoded = tokenize_sequences(texts, tokenizer, max_length=max_length, truncation=truncation)
    lengths = encoded.pop("lengths")
    truncated = 0
    if truncation:
        full = torch.tensor([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]])
        truncated = int((full > lengths).sum())
        if truncated:
            print(f"{name}: {truncated} of {len(texts)} sequences truncated to {max_length} tokens")
    encoded["labels"] = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX)
    metadata = metadata if metadata is not None else pd.DataFrame(index=range(len(texts)))
    return Corpus(name, "", "text", texts, metadata.reset_index(drop=True), encoded,
                  cache_key({"texts": texts, "max_length": max_length, "truncation": truncation}), truncated)


def training_batches(encoded: dict[str, torch.Tensor], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Tokenized sequences (input_ids, attention_mask (N, T)) -> batches labelled with their own tokens, -100 at
    padding (the summed training loss L(z) of each sequence)."""
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX)
    return iterate_batches({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                            "labels": labels}, batch_size)


def engine_queries(queries: Sequence[Query]) -> list[EngineQuery]:
    return [EngineQuery(q.name, q.prompt, q.completion) for q in queries]


# ---- scoring -------------------------------------------------------------------------------------------------------

@dataclass
class ModelScores:
    """Scores of a query set over a corpus for one model, as the shards hold them.

    frame: one row per scored (query, sequence) pair: query, train_id, score, layer:<module path> ... (summing
    to score), token_scores (array over the sequence's tokens, summing to score, for each query's top_k_tokens
    highest-scoring sequences; None elsewhere).
    """

    model: LoadedModel
    query_names: list[str]
    layer_names: list[str]
    frame: pd.DataFrame
    num_sequences: int
    factors_dir: Path
    scores_dir: Path
    timings_s: dict[str, float] = field(default_factory=dict)
    training_sequences: int | None = None  # N of the fitting corpus: one added copy is epsilon = 1/N

    def matrix(self, column: str = "score") -> np.ndarray:
        """(Q, N) float64 of one score column, NaN where a pair was not scored (BM25-filtered out)."""
        out = np.full((len(self.query_names), self.num_sequences), np.nan)
        rows = {name: i for i, name in enumerate(self.query_names)}
        out[self.frame["query"].map(rows).to_numpy(), self.frame["train_id"].to_numpy()] = self.frame[column].to_numpy()
        return out

    def influence_scores(self, width: int) -> InfluenceScores:
        """Dense InfluenceScores (total (Q, N), per_layer (Q, N, L), per_token (Q, N, width) zero where not kept).

        Only for unfiltered runs: a pair left out by the BM25 filter has no score to put in a dense matrix.
        """
        if len(self.frame) != len(self.query_names) * self.num_sequences:
            raise ValueError(f"{len(self.frame)} of {len(self.query_names) * self.num_sequences} pairs were scored "
                             "(BM25-filtered): dense scores need tfidf.top_k=null")
        total = torch.from_numpy(self.matrix()).float()
        per_layer = torch.stack([torch.from_numpy(self.matrix(f"layer:{n}")).float() for n in self.layer_names], -1)
        per_token = torch.zeros(len(self.query_names), self.num_sequences, width)
        rows = {name: i for i, name in enumerate(self.query_names)}
        kept = self.frame[self.frame["token_scores"].notna()]
        for query, train_id, values in zip(kept["query"], kept["train_id"], kept["token_scores"]):
            per_token[rows[query], int(train_id), : len(values)] = torch.as_tensor(np.asarray(values, dtype=np.float32))
        return InfluenceScores(list(self.query_names), list(self.layer_names), total, per_layer, per_token)


@dataclass
class ScorePlan:
    """Where a model's factors and score shards live: named by cache_key over what determines them."""

    layers: list
    factors_dir: Path
    scores_dir: Path
    fit_count: int


# scoring settings the dense shards do not depend on: the token scores are cached per top_k_tokens inside them
SCORING_NOT_IN_KEY = ("fit_checkpoint_every", "top_k_tokens")


def plan_scores(loaded: LoadedModel, corpus: Corpus, queries: Sequence[Query], influence: DictConfig,
                scoring: ScoringSettings, artifacts: str | Path, scored: Corpus | None = None) -> ScorePlan:
    """scored: the sequences to score when they are not the fitting corpus (probes, translations); None: corpus."""
    check_influence_settings(influence)
    layers = influence_layers(loaded.model, influence)
    numbers = numerical_settings(influence)
    factor_numbers = {k: v for k, v in numbers.items() if k not in ("query_batch_size", "score_batch_size",
                                                                    "per_token", "max_length")}
    fit_count = min(influence.num_fit_sequences or len(corpus), len(corpus))
    layer_names = [l.name for l in layers]  # resolved: 'auto' means whatever the registry selects for this model
    factors_dir = Path(artifacts) / "factors" / loaded.name / cache_key(
        {"model": loaded.fingerprint, "corpus": corpus.fingerprint, "fit_count": fit_count, "influence": factor_numbers,
         "layers": layer_names})
    scores_dir = Path(artifacts) / "scores" / loaded.name / cache_key(
        {"factors": str(factors_dir), "scored": (scored or corpus).fingerprint,
         "queries": [q.to_dict() for q in queries], "influence": numbers, "layers": layer_names,
         "scoring": {k: v for k, v in scoring.__dict__.items() if k not in SCORING_NOT_IN_KEY}})
    return ScorePlan(layers, factors_dir, scores_dir, fit_count)


def saved_model_scores(loaded: LoadedModel, corpus: Corpus, queries: Sequence[Query], influence: DictConfig,
                       scoring: ScoringSettings, artifacts: str | Path, scored: Corpus | None = None) -> ModelScores:
    """The scores a finished run saved for exactly these inputs and settings; computes nothing (compute=false)."""
    plan = plan_scores(loaded, corpus, queries, influence, scoring, artifacts, scored)
    shards = plan.scores_dir / "shards"
    if not (shards / "manifest.json").exists():
        raise FileNotFoundError(f"no saved scores for {loaded.name} in {shards}; compute=false only reads saved "
                                "results: run the same command with compute=true first")
    tokens = token_folder(shards, scoring.top_k_tokens)
    if scoring.top_k_tokens and not (tokens / "manifest.json").exists():
        raise FileNotFoundError(f"no saved token scores for top_k_tokens={scoring.top_k_tokens} of {loaded.name} in "
                                f"{tokens}; compute=false only reads saved results: run the same command with "
                                "compute=true (it reuses the saved dense scores and runs only the token pass)")
    return ModelScores(loaded, [q.name for q in queries], [l.name for l in plan.layers],
                       read_scores(shards, top_k_tokens=scoring.top_k_tokens), len(scored or corpus),
                       plan.factors_dir, plan.scores_dir, training_sequences=len(corpus))


def fit_plan_factors(loaded: LoadedModel, corpus: Corpus, plan: ScorePlan, influence: DictConfig,
                     scoring: ScoringSettings, progress: bool = True):
    """The plan's EK-FAC factors on its first fit_count corpus sequences: fitted, or reused from plan.factors_dir."""
    fit_args = factor_arguments(influence)
    # a one-pass fit keeps its tokens in memory, which no pass checkpoint could restore: finished stages are saved
    fit_args.checkpoint_every = 0 if fit_args.token_cache_bytes else scoring.fit_checkpoint_every
    fit_args.progress = progress and influence.progress
    fit_data = {k: v[:plan.fit_count] for k, v in corpus.encoded.items()}
    return fit_factors(loaded.model, plan.layers, CausalLMTask(), iterate_batches(fit_data, influence.fit_batch_size),
                       fit_args, output_dir=plan.factors_dir, data_fingerprint=f"{corpus.fingerprint}:{plan.fit_count}")


def score_model(loaded: LoadedModel, corpus: Corpus, queries: Sequence[Query], influence: DictConfig,
                scoring: ScoringSettings, artifacts: str | Path, progress: bool = True,
                scored: Corpus | None = None) -> ModelScores:
    """Fit (or reuse) factors on `corpus`, precondition the queries, optionally BM25-filter, and score in resumable
    shards the sequences of `scored` (default: the corpus itself; e.g. probe sequences that are not in training)."""
    from influence_core import distributed

    plan = plan_scores(loaded, corpus, queries, influence, scoring, artifacts, scored)
    target = scored or corpus
    timings: dict[str, float] = {}
    model, tokenizer, task, layers = loaded.model, loaded.tokenizer, CausalLMTask(), plan.layers

    start = time.perf_counter()
    factors = fit_plan_factors(loaded, corpus, plan, influence, scoring, progress)
    timings["factors"] = time.perf_counter() - start

    start = time.perf_counter()
    encoded_queries = encode_queries(tokenizer, engine_queries(queries), max_length=model_max_length(model))
    # preconditioned and, at a query rank, truncated batch by batch: the full-rank queries of all Q are never held
    stored = query_gradients(model, layers, task,
                             iterate_batches(encoded_queries, influence.query_batch_size, by_length=True),
                             progress=progress and influence.progress and distributed.is_main(), factors=factors,
                             query_rank=scoring.query_rank)
    timings["queries"] = time.perf_counter() - start

    candidates = None
    if scoring.tfidf_top_k is not None:
        start = time.perf_counter()
        candidates = tfidf_candidates(target.texts, {q.name: q.prompt + q.completion for q in queries},
                                      min(scoring.tfidf_top_k, len(target)), k1=scoring.tfidf_k1, b=scoring.tfidf_b)
        timings["tfidf"] = time.perf_counter() - start

    start = time.perf_counter()
    shards = score_in_shards(
        model, layers, task, target.encoded, stored, [q.name for q in queries], plan.scores_dir / "shards",
        ShardArguments(shard_size=scoring.shard_size, batch_size=influence.score_batch_size,
                       top_k_tokens=scoring.top_k_tokens),
        ScoreArguments(progress=progress and influence.progress, query_rank=scoring.query_rank,
                       output_blocks=influence.output_blocks),
        candidates=candidates, run_identity={"corpus": target.fingerprint, "factors": str(plan.factors_dir)})
    timings["scores"] = time.perf_counter() - start
    return ModelScores(loaded, [q.name for q in queries], [l.name for l in layers],
                       read_scores(shards, top_k_tokens=scoring.top_k_tokens), len(target), plan.factors_dir,
                       plan.scores_dir, timings, training_sequences=len(corpus))


def layer_token_scores(loaded: LoadedModel, corpus: Corpus, queries: Sequence[Query], influence: DictConfig,
                       scoring: ScoringSettings, artifacts: str | Path, scored: Corpus) -> np.ndarray:
    """Influence split over layers and tokens at once (paper Fig 4, Eq 30-31): (Q, N', L, T) for the sequences
    of `scored` (a few: each layer is one more pass over them), with the corpus's cached factors.

    Entry [q, n, l, t] is layer l's share of token t's influence; summed over t it is the per-layer split, over
    l the token-wise split, over both the total influence.
    """
    plan = plan_scores(loaded, corpus, queries, influence, scoring, artifacts, scored)
    task = CausalLMTask()
    fit_args = factor_arguments(influence)
    fit_args.progress = False
    fit_data = {k: v[:plan.fit_count] for k, v in corpus.encoded.items()}
    factors = fit_factors(loaded.model, plan.layers, task, iterate_batches(fit_data, influence.fit_batch_size),
                          fit_args, output_dir=plan.factors_dir, data_fingerprint=f"{corpus.fingerprint}:{plan.fit_count}")
    encoded_queries = encode_queries(loaded.tokenizer, engine_queries(queries), max_length=model_max_length(loaded.model))
    preconditioned = query_gradients(loaded.model, plan.layers, task,
                                     iterate_batches(encoded_queries, influence.query_batch_size, by_length=True),
                                     progress=False,
                                     factors=factors)
    per_layer = []
    for layer in plan.layers:
        scores = compute_scores(loaded.model, [layer], task, iterate_batches(scored.encoded, influence.score_batch_size),
                                {layer.name: preconditioned[layer.name]}, [q.name for q in queries],
                                ScoreArguments(per_token=True, progress=False, output_blocks=influence.output_blocks))
        per_layer.append(scores.per_token.double().numpy())  # (Q, N', T)
    return np.stack(per_layer, axis=2)


# ---- tables --------------------------------------------------------------------------------------------------------

def token_spans(ids: list[int], tokenizer) -> list[tuple[str, int, int]]:
    """A sequence's decoded pieces with their token spans [start, end). Byte-level tokens that split a character
    (decoding alone to U+FFFD) are merged with the next ones; one batched decode covers the common case."""
    singles = tokenizer.batch_decode([[i] for i in ids])
    spans, start = [], 0
    for end in range(1, len(ids) + 1):
        text = singles[start] if end - start == 1 else tokenizer.decode(ids[start:end])
        if not text.endswith("\ufffd"):
            spans.append((text, start, end))
            start = end
    if start < len(ids):
        spans.append((tokenizer.decode(ids[start:]), start, len(ids)))
    return spans


def single_token_dominance(token_scores: np.ndarray) -> float:
    """||a||_2 / ||a||_1 of token-wise influences a (T,); above 2/3 one token dominates (paper Sec 5: spurious)."""
    token_scores = np.asarray(token_scores, dtype=np.float64)
    l1 = np.abs(token_scores).sum()
    return float(np.sqrt((token_scores ** 2).sum()) / l1) if l1 > 0 else float("nan")


def top_sequences(scores: ModelScores, corpus: Corpus, k: int) -> pd.DataFrame:
    """The contract's top_sequences table: per query its k most positively influential sequences.

    Columns: model, query, rank, train_id, influence (nats of log p(completion) per unit epsilon), influence_per_copy
    (influence / N: the change one added copy among the N training sequences predicts), text, tokens (decoded pieces), token_scores (aligned with
    tokens; None where not kept), layer:<name>..., single_token_dominance, spurious, and corpus metadata columns.
    """
    order = {name: i for i, name in enumerate(scores.query_names)}
    top = (scores.frame.assign(query_order=scores.frame["query"].map(order))
           .sort_values(["query_order", "score"], ascending=[True, False], kind="stable")
           .groupby("query", sort=False).head(k))
    rows = []
    for query, group in top.groupby("query", sort=False):
        for rank, row in enumerate(group.to_dict("records"), start=1):
            train_id = int(row["train_id"])
            length = int(corpus.encoded["attention_mask"][train_id].sum())
            pieces = token_spans(corpus.encoded["input_ids"][train_id, :length].tolist(), scores.model.tokenizer)
            values = row["token_scores"]
            has_tokens = values is not None and len(values) > 0
            dominance = single_token_dominance(values) if has_tokens else None
            record = {"model": scores.model.name, "query": query, "rank": rank, "train_id": train_id,
                      "influence": float(row["score"]),
                      "influence_per_copy": float(row["score"]) / (scores.training_sequences or scores.num_sequences),
                      "text": corpus.texts[train_id],
                      "tokens": [text for text, _, _ in pieces],
                      "token_scores": [float(np.sum(values[a:b])) for _, a, b in pieces] if has_tokens else None}
            record.update({f"layer:{n}": float(row[f"layer:{n}"]) for n in scores.layer_names})
            record["single_token_dominance"] = dominance
            record["spurious"] = None if dominance is None else bool(dominance > SPURIOUS_DOMINANCE)
            for column in corpus.metadata.columns:
                value = corpus.metadata[column].iloc[train_id]
                record[column] = value.tolist() if hasattr(value, "tolist") else value
            rows.append(record)
    return pd.DataFrame(rows)


def queries_table(queries: Sequence[Query]) -> pd.DataFrame:
    """The contract's queries table: name, prompt, completion, study."""
    return pd.DataFrame([{"name": q.name, "prompt": q.prompt, "completion": q.completion, "study": q.study}
                         for q in queries])
