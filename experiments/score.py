"""Score a query set over your corpus with your model, through the one pipeline (experiments/pipeline.py).

    python -m experiments.score model.name_or_path=MODEL data.path=CORPUS queries.path=QUERIES
    python -m experiments.score micro_zoo=true tfidf.top_k=100 query_rank=null     # make score: the micro zoo
    torchrun --nproc_per_node 2 -m experiments.score ...                            # data parallel

model + corpus + queries -> factors (cached) -> preconditioned rank-r queries -> optional BM25 candidates ->
resumable shards (cached under artifacts/scores/) -> run_dir: queries.csv, top_sequences.jsonl (+ a readable
csv), study.json. A rerun of the same command reuses the factors and every finished shard.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from experiments import pipeline
from experiments.loading import model_max_length
from experiments.queries import load_query_file
from experiments.results import StudyRecord, write_rows, write_study

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
REQUIRED = {"model.name_or_path": "the model folder (save_pretrained) or a hub name in the local cache",
            "data.path": "the corpus: jsonl/json/parquet/csv/txt file, a folder of them, or a save_to_disk folder",
            "queries.path": "a .json/.jsonl/.yaml list of {name, prompt, completion}"}


def resolve_inputs(cfg: DictConfig) -> None:
    """Fill the micro zoo's paths when micro_zoo=true; otherwise refuse a partial set of paths, naming the missing."""
    given = [k for k in REQUIRED if not OmegaConf.is_missing(cfg, k) and OmegaConf.select(cfg, k) is not None]
    if cfg.micro_zoo:
        if given:
            raise ValueError(f"micro_zoo=true scores the micro zoo; do not also give {given}")
        from experiments.zoo.micro import build_micro_zoo
        from influence_core import distributed

        zoo = build_micro_zoo(Path(cfg.artifacts) / "micro_zoo") if distributed.is_main() else None
        distributed.barrier()  # rank 0 builds the zoo once; the others then find it cached
        zoo = zoo or build_micro_zoo(Path(cfg.artifacts) / "micro_zoo")
        for key, value in {"model.name_or_path": zoo.model_path, "data.path": zoo.dataset_path,
                           "queries.path": zoo.queries_path}.items():
            OmegaConf.update(cfg, key, str(value))
        OmegaConf.update(cfg, "model.name", cfg.model.name or "micro")
        return
    missing = [k for k in REQUIRED if k not in given]
    if missing:
        raise ValueError("missing " + "; ".join(f"{k} ({REQUIRED[k]})" for k in missing) +
                         ". Give every path, or micro_zoo=true for the built-in example")


def run(cfg: DictConfig, run_dir: str | Path) -> StudyRecord:
    """The score run on a composed config, writing its tables and study.json into run_dir."""
    from influence_core import distributed

    pipeline.check_influence_settings(cfg.influence)
    scoring = pipeline.ScoringSettings.from_config(cfg)  # refuses bad values before anything is loaded
    if not isinstance(cfg.top_k, int) or cfg.top_k < 1:
        raise ValueError(f"top_k={cfg.top_k!r}: give an integer >= 1 (rows per query in top_sequences)")
    resolve_inputs(cfg)
    queries = load_query_file(cfg.queries.path, list(cfg.queries.names) if cfg.queries.names else None)
    name = cfg.model.name or Path(str(cfg.model.name_or_path)).name
    loaded = pipeline.load_model(name, cfg.model.name_or_path, dtype=cfg.model.dtype, device=cfg.model.device,
                                 seed=cfg.model.seed)
    context = model_max_length(loaded.model)
    max_length = min(int(cfg.data.max_length), context) if cfg.data.max_length else context
    corpus = pipeline.load_corpus(cfg.data.path, loaded.tokenizer, max_length, split=cfg.data.split,
                                  text_column=cfg.data.text_column, truncation=bool(cfg.data.truncation))
    scores = pipeline.score_model(loaded, corpus, queries, cfg.influence, scoring, cfg.artifacts)
    if not distributed.is_main():
        return None

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pipeline.queries_table(queries).to_csv(run_dir / "queries.csv", index=False)
    top = pipeline.top_sequences(scores, corpus, cfg.top_k)
    write_rows(top, run_dir / "top_sequences.jsonl")
    readable = top.drop(columns=["tokens", "token_scores"]).assign(text=top["text"].str.slice(0, 160))
    readable.to_csv(run_dir / "top_sequences.csv", index=False)
    record = StudyRecord(
        study="score", models=[loaded.record()], corpus=corpus.record(), queries=[q.name for q in queries],
        settings=OmegaConf.to_container(cfg, resolve=True),
        tables={"queries": "queries.csv", "top_sequences": "top_sequences.jsonl",
                "top_sequences_readable": "top_sequences.csv"},
        command=cfg.get("command") or "python -m experiments.score",
        artifacts={loaded.name: {"factors": str(scores.factors_dir), "scores": str(scores.scores_dir)}})
    write_study(run_dir, record)
    print(readable.groupby("query", sort=False).head(3)[["query", "rank", "influence", "text"]]
          .to_string(index=False, max_colwidth=70))
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in scores.timings_s.items())
    print(f"{len(queries)} queries x {len(corpus)} sequences, {len(scores.frame)} pairs scored ({timing})")
    print(f"tables and study.json: {run_dir}\nreport: influence-lab report {run_dir}\n"
          f"factors: {scores.factors_dir}\nscore shards: {scores.scores_dir / 'shards'}")
    return record


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="experiment/score")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from influence_core import distributed

    distributed.init_from_environment()
    overrides = " ".join(HydraConfig.get().overrides.task)
    OmegaConf.set_struct(cfg, False)
    cfg.command = f"python -m experiments.score {overrides}".strip()
    run(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
