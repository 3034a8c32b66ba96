"""`influence-lab index build` / `index query`: the gradient index (influence_core/index.py) over the pipeline's inputs.

    build: model + corpus -> EK-FAC factors (the pipeline's cache) -> every sequence's compressed gradient, in
           resumable shards under the index folder (manifest.json says where the model, corpus and factors are)
    query: queries -> preconditioned query gradients -> index scores over all N (no pass over the corpus) ->
           each query's `rerank` best rows scored again by exact EK-FAC (compute_scores) -> top_sequences.csv
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from experiments import pipeline
from experiments.loading import model_max_length
from experiments.queries import load_query_file
from influence_core import CausalLMTask, encode_queries, iterate_batches, load_factors
from influence_core.index import GradientIndex, IndexArguments, IndexMismatchError, build_index, query_index, rerank


def build(cfg: DictConfig, index_args: IndexArguments, out: str | Path) -> GradientIndex:
    """Fit (or reuse) the factors of the score config's model and corpus, then build (or finish) the index in `out`."""
    from experiments.score import REQUIRED, resolve_inputs

    pipeline.check_influence_settings(cfg.influence)
    scoring = pipeline.ScoringSettings.from_config(cfg)
    if cfg.micro_zoo:
        resolve_inputs(cfg)
    else:  # the score app's inputs less the queries, which an index does not need
        missing = [k for k in ("model.name_or_path", "data.path") if OmegaConf.is_missing(cfg, k)]
        if missing:
            raise SystemExit("influence-lab index build: missing " + "; ".join(f"{k} ({REQUIRED[k]})" for k in missing)
                             + "; give --model and --data, or --micro-zoo")
    name = cfg.model.name or Path(str(cfg.model.name_or_path)).name
    loaded = pipeline.load_model(name, cfg.model.name_or_path, dtype=cfg.model.dtype, device=cfg.model.device)
    context = model_max_length(loaded.model)
    max_length = min(int(cfg.data.max_length), context) if cfg.data.max_length else context
    corpus = pipeline.load_corpus(cfg.data.path, loaded.tokenizer, max_length, split=cfg.data.split,
                                  text_column=cfg.data.text_column, truncation=bool(cfg.data.truncation))
    plan = pipeline.plan_scores(loaded, corpus, [], cfg.influence, scoring, cfg.artifacts)
    start = time.perf_counter()
    factors = pipeline.fit_plan_factors(loaded, corpus, plan, cfg.influence, scoring)
    fitted = time.perf_counter() - start
    selection = {"module_patterns": OmegaConf.to_container(cfg.influence, resolve=True)["module_patterns"],
                 "share_inputs": OmegaConf.to_container(cfg.influence, resolve=True).get("share_inputs")}
    source = {"model": {"name": name, "path": absolute(cfg.model.name_or_path), "dtype": cfg.model.dtype,
                        "device": cfg.model.device},
              "corpus": {"path": absolute(cfg.data.path), "split": cfg.data.split, "text_column": cfg.data.text_column,
                         "max_length": max_length, "truncation": bool(cfg.data.truncation),
                         "fingerprint": corpus.fingerprint},
              "factors_dir": absolute(plan.factors_dir),
              "layer_selection": selection, "layers": [layer.name for layer in plan.layers],
              "score_batch_size": int(cfg.influence.score_batch_size)}
    start = time.perf_counter()
    index = build_index(loaded.model, plan.layers, CausalLMTask(), corpus.encoded, factors, out, index_args, source)
    print(f"index of {index.num_sequences} sequences x {len(plan.layers)} layers, {index.bytes_per_sequence} bytes per "
          f"sequence, in {out} (factors {fitted:.1f}s, build {time.perf_counter() - start:.1f}s)\n"
          f"query it: influence-lab index query --index {out} --queries QUERIES")
    return index


def absolute(path) -> str:
    """A local path made absolute (an index is queried from anywhere); a hub name as given."""
    return str(Path(path).resolve()) if Path(path).exists() else str(path)


def query(index_dir: str | Path, queries_path: str | Path, candidates: int = 500, top_k: int = 10,
          out: str | Path | None = None, query_batch_size: int = 8) -> pd.DataFrame:
    """Answer a query file from the index; with candidates > 0, re-rank each query's best rows by exact EK-FAC."""
    index = GradientIndex(index_dir)
    source = index.manifest.get("run") or {}
    if "model" not in source:
        raise IndexMismatchError(f"the index in {index_dir} was not built by `influence-lab index build` (its manifest "
                                 "names no model or corpus); query it with influence_core.index.query_index")
    model_info, corpus_info = source["model"], source["corpus"]
    loaded = pipeline.load_model(model_info["name"], model_info["path"], dtype=model_info["dtype"],
                                 device=model_info["device"])
    layers = pipeline.influence_layers(loaded.model, OmegaConf.create(source["layer_selection"]))
    if [layer.name for layer in layers] != source["layers"]:
        raise IndexMismatchError(f"the model's tracked layers are not the index's ({source['layers'][:2]} ...); "
                                 "rebuild the index for this model")
    factors = load_factors(source["factors_dir"], layers)
    saved_damping = index.manifest["damping"]
    if any(abs(factors.damping_for(n) - saved_damping[n]) > 1e-12 * max(1.0, abs(saved_damping[n])) for n in saved_damping):
        raise IndexMismatchError(f"the factors in {source['factors_dir']} have another damping than the index was built "
                                 "with; rebuild the index")
    queries = load_query_file(queries_path)
    names = [q.name for q in queries]
    encoded = encode_queries(loaded.tokenizer, pipeline.engine_queries(queries),
                             max_length=model_max_length(loaded.model))
    task = CausalLMTask()
    start = time.perf_counter()
    scores, preconditioned = query_index(loaded.model, layers, task,
                                         iterate_batches(encoded, query_batch_size, by_length=True),
                                         factors, index)
    timings = {"index": time.perf_counter() - start}
    corpus = None
    if candidates > 0:
        start = time.perf_counter()
        corpus = pipeline.load_corpus(corpus_info["path"], loaded.tokenizer, corpus_info["max_length"],
                                      split=corpus_info["split"], text_column=corpus_info["text_column"],
                                      truncation=corpus_info["truncation"])
        if corpus.fingerprint != corpus_info["fingerprint"]:
            raise IndexMismatchError(f"the corpus at {corpus_info['path']} changed since the index was built "
                                     f"(fingerprint {corpus.fingerprint}, index {corpus_info['fingerprint']}); rebuild it")
        rows, exact = rerank(loaded.model, layers, task, corpus.encoded, preconditioned, scores, candidates,
                             source.get("score_batch_size", 8))
        timings["rerank"] = time.perf_counter() - start
    else:
        top = torch.topk(scores, min(top_k, scores.shape[1]), dim=1)
        rows, exact = top.indices, None
    records = []
    for q, name in enumerate(names):
        for rank, row in enumerate(rows[q, :top_k].tolist()):
            record = {"query": name, "rank": rank + 1, "train_id": row, "index_score": float(scores[q, row])}
            if exact is not None:
                record["influence"] = float(exact[q, rank])
                record["text"] = corpus.texts[row][:160]
            records.append(record)
    table = pd.DataFrame(records)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        table.to_csv(Path(out) / "top_sequences.csv", index=False)
    shown = ["query", "rank", "train_id", "index_score"] + (["influence", "text"] if exact is not None else [])
    print(table.groupby("query", sort=False).head(3)[shown].to_string(index=False, max_colwidth=70))
    timing = ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())
    print(f"{len(names)} queries x {index.num_sequences} indexed sequences ({timing}; re-ranked top {candidates})"
          + (f"\ntop sequences: {Path(out) / 'top_sequences.csv'}" if out is not None else ""))
    return table
