"""Score a query set over a training set in resumable shards, optionally TF-IDF filtered and data parallel.

    python -m experiments.score                                     # micro zoo, rank-32 query batching
    python -m experiments.score tfidf.top_k=100 query_rank=null     # BM25 filter, full-rank queries
    torchrun --nproc_per_node 2 -m experiments.score                # 2 processes (gloo on CPU, NCCL on GPU)

Pipeline: fit EK-FAC factors (passes split over ranks, sums all-reduced, checkpointed every K batches) ->
preconditioned query gradients -> rank-r SVD (query batching) -> optional BM25 top-k candidates per query ->
shards of training sequences scored and written atomically to <run_dir>/shards (rank i mod N takes shard i) ->
rank 0 writes top_sequences.csv and manifest.json. A rerun of the same command resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import hydra
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from experiments.common import config_digest, factor_arguments
from experiments.loading import load_model_and_tokenizer, load_text_dataset, model_max_length, tokenize_sequences
from influence_core import (CausalLMTask, Query, ScoreArguments, encode_queries, fit_factors, iterate_batches,
                            query_gradients, track_layers)
from influence_core import distributed
from influence_core.lowrank import check_rank, compress_queries, query_nbytes
from influence_core.sharding import ShardArguments, read_scores, score_in_shards
from influence_core.task import IGNORE_INDEX
from influence_core.tfidf import tfidf_candidates

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def resolve_paths(cfg: DictConfig) -> tuple[Path, Path, Path]:
    """(model, dataset, queries.json): the config's paths, or the micro zoo's (built on first use)."""
    if cfg.model_path and cfg.dataset_path and cfg.queries_path:
        return Path(cfg.model_path), Path(cfg.dataset_path), Path(cfg.queries_path)
    from experiments.zoo.micro import build_micro_zoo

    zoo = build_micro_zoo(Path(cfg.micro_zoo)) if distributed.is_main() else None
    distributed.barrier()  # rank 0 builds the zoo once; the others then find it cached
    zoo = zoo or build_micro_zoo(Path(cfg.micro_zoo))
    return (Path(cfg.model_path or zoo.model_path), Path(cfg.dataset_path or zoo.dataset_path),
            Path(cfg.queries_path or zoo.queries_path))


def load_queries(path: Path, study: str | None, count: int | None) -> list[Query]:
    from experiments.zoo.queries import load_queries as load_zoo_queries

    chosen = [q for q in load_zoo_queries(path) if study is None or q.study == study]
    if not chosen:
        raise ValueError(f"no queries in {path} for query_study={study!r}")
    return [Query(q.name, q.prompt, q.completion) for q in chosen[: count or None]]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="experiment/score")
def main(cfg: DictConfig) -> None:
    if cfg.query_rank is not None:
        check_rank(cfg.query_rank)  # refuse bad settings before minutes of factor fitting
    if cfg.tfidf.top_k is not None and int(cfg.tfidf.top_k) < 1:
        raise ValueError(f"tfidf.top_k must be >= 1 sequences per query (paper: 10,000) or null, got {cfg.tfidf.top_k}")
    distributed.init_from_environment()
    main_rank = distributed.is_main()
    timings: dict[str, float] = {}
    model_path, dataset_path, queries_path = resolve_paths(cfg)
    model, tokenizer = load_model_and_tokenizer(model_path, device=distributed.device_for_rank())
    train = load_text_dataset(dataset_path, split=cfg.split, text_column=cfg.text_column)
    encoded = tokenize_sequences(train, tokenizer, max_length=model_max_length(model), text_column=cfg.text_column,
                                 truncation=True)
    encoded.pop("lengths")
    encoded["labels"] = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX)
    queries = load_queries(queries_path, cfg.query_study, cfg.num_queries)
    task = CausalLMTask()
    influence = cfg.influence
    layers = track_layers(model, list(influence.module_patterns))

    start = time.perf_counter()
    fit_count = influence.num_fit_sequences or len(encoded["input_ids"])
    fit_args = factor_arguments(influence)
    fit_args.checkpoint_every = cfg.fit_checkpoint_every
    # shared by every run on the same model, data and influence settings (the manifest refuses anything else)
    source = hashlib.sha256(f"{model_path.resolve()}|{dataset_path.resolve()}|{cfg.split}".encode()).hexdigest()[:8]
    factors_dir = Path(cfg.artifacts) / "factors" / f"score-{source}-{config_digest(influence)}"
    factors = fit_factors(model, layers, task, iterate_batches({k: v[:fit_count] for k, v in encoded.items()},
                                                               influence.fit_batch_size),
                          fit_args, output_dir=factors_dir, data_fingerprint=f"{train._fingerprint}:{fit_count}")
    timings["factors"] = time.perf_counter() - start

    start = time.perf_counter()
    preconditioned = query_gradients(model, layers, task, iterate_batches(encode_queries(tokenizer, queries),
                                                                          influence.query_batch_size),
                                     progress=influence.progress and main_rank, factors=factors)
    stored = compress_queries(preconditioned, cfg.query_rank) if cfg.query_rank is not None else preconditioned
    timings["queries"] = time.perf_counter() - start

    candidates = None
    if cfg.tfidf.top_k is not None:
        start = time.perf_counter()
        candidates = tfidf_candidates(list(train[cfg.text_column]), {q.name: q.prompt + q.completion for q in queries},
                                      int(cfg.tfidf.top_k), k1=cfg.tfidf.k1, b=cfg.tfidf.b)
        timings["tfidf"] = time.perf_counter() - start

    start = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    shards = score_in_shards(
        model, layers, task, encoded, stored, [q.name for q in queries], run_dir / "shards",
        ShardArguments(shard_size=cfg.shard_size, batch_size=influence.score_batch_size, top_k_tokens=cfg.top_k_tokens),
        ScoreArguments(progress=influence.progress, query_rank=cfg.query_rank), candidates=candidates,
        run_identity={"model": str(model_path), "dataset": str(dataset_path), "split": cfg.split,
                      "factors": str(factors_dir), "tfidf": OmegaConf.to_container(cfg.tfidf)})
    timings["scores"] = time.perf_counter() - start
    if not main_rank:
        return

    frame = read_scores(shards)
    top = (frame.sort_values("score", ascending=False).groupby("query", sort=False).head(cfg.top_k)
           .sort_values(["query", "score"], ascending=[True, False]))
    texts = train.select_columns([cfg.text_column]).to_pandas()[cfg.text_column]
    table = pd.DataFrame({"query": top["query"], "train_id": top["train_id"], "influence": top["score"],
                          "text": [texts.iloc[i][:160] for i in top["train_id"]]})
    table.to_csv(run_dir / "top_sequences.csv", index=False)
    manifest = {"model": str(model_path), "dataset": str(dataset_path), "queries": [q.name for q in queries],
                "num_sequences": len(encoded["input_ids"]), "rows_scored": len(frame),
                "query_bytes_per_query": query_nbytes(stored), "world_size": distributed.world_size(),
                "timings_s": {k: round(v, 2) for k, v in timings.items()}, "factors_dir": str(factors_dir),
                "config": OmegaConf.to_container(cfg, resolve=True), "torch": torch.__version__}
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    print(table.groupby("query").head(3).to_string(index=False, max_colwidth=70))
    print(f"{len(queries)} queries x {len(encoded['input_ids'])} sequences, {len(frame)} pairs scored "
          f"({', '.join(f'{k} {v:.1f}s' for k, v in timings.items())}). Shards in {shards}")


if __name__ == "__main__":
    main()
