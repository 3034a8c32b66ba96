"""Shared plumbing of the studies: load a model and the world, score a query set once per model, save outputs.

Every study follows one line: study config -> StudyInputs per model -> cached InfluenceRun -> analysis ->
tables (csv + md), figures (png + pdf) and a verdict table, in the Hydra run folder and in figures/<study>/.
Scores are cached under artifacts/scores/ by model, query set and influence config, so `make figures` and the
other studies reuse them instead of recomputing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from experiments.common import InfluenceRun, config_digest, run_influence, save_run, top_sequences_table  # noqa: E402
from experiments.loading import (load_model_and_tokenizer, load_text_dataset, model_max_length,  # noqa: E402
                                 tokenize_sequences)
from experiments.zoo.queries import Query as WorldQuery  # noqa: E402
from experiments.zoo.queries import load_queries  # noqa: E402
from influence_core import InfluenceScores, Query, model_fingerprint, track_layers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(REPO / "configs")


@dataclass
class StudyInputs:
    """One model with the training set and the queries it is studied on."""

    model_name: str
    model: torch.nn.Module
    tokenizer: object
    train_metadata: pd.DataFrame  # one row per training sequence: doc_id, family, topic, language, fact_ids, ...
    train_texts: list[str]
    encoded: dict[str, torch.Tensor]  # input_ids, attention_mask (N, T)
    queries: list[WorldQuery]
    fingerprint: str  # the training set's (datasets) fingerprint
    model_fingerprint: str  # hash of the model's affine weights: a retrained model must not reuse cached scores


def model_config(name: str) -> DictConfig:
    """configs/model/<name>.yaml, with a clear error for an unknown name."""
    path = REPO / "configs" / "model" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml"))
        raise FileNotFoundError(f"unknown model '{name}'; configs/model has {known}")
    return OmegaConf.load(path)


def select_queries(all_queries: Sequence[WorldQuery], names: Sequence[str] | None,
                   studies: Sequence[str] | None = None) -> list[WorldQuery]:
    """Queries by name (in the given order) and/or by study; unknown names are an error."""
    by_name = {q.name: q for q in all_queries}
    chosen = []
    for name in names or []:
        if name not in by_name:
            raise KeyError(f"query '{name}' is not in the world's query set (e.g. {list(by_name)[:5]})")
        chosen.append(by_name[name])
    for q in all_queries:
        if studies and q.study in studies and q not in chosen:
            chosen.append(q)
    if not chosen:
        raise ValueError("no queries selected; set queries.names or queries.studies")
    return chosen


def load_study_inputs(model_name: str, model_path: str, data: DictConfig, queries: Sequence[WorldQuery],
                      device: str = "cpu") -> StudyInputs:
    model, tokenizer = load_model_and_tokenizer(model_path, device=device)
    train = load_text_dataset(data.path, split=data.split, text_column=data.text_column)
    max_length = min(int(data.max_length), model_max_length(model))
    encoded = tokenize_sequences(train, tokenizer, max_length=max_length, text_column=data.text_column,
                                 truncation=bool(data.truncation))
    encoded.pop("lengths")
    metadata = train.remove_columns([data.text_column]).to_pandas()
    return StudyInputs(model_name, model, tokenizer, metadata, list(train[data.text_column]), encoded, list(queries),
                       train._fingerprint, model_fingerprint(track_layers(model, ["*"])))


def numerical_settings(influence: DictConfig) -> DictConfig:
    """The influence settings that change the numbers: cache keys must not depend on e.g. progress bars."""
    return OmegaConf.create({k: v for k, v in OmegaConf.to_container(influence, resolve=True).items() if k != "progress"})


def cached_influence(inputs: StudyInputs, influence: DictConfig, artifacts: Path, top_k_tokens: int = 0) -> InfluenceRun:
    """Scores of every query over every training sequence, computed once per (model, queries, config).

    Token-wise influence is costly for all sequences (Q x N x T x d_out x d_in), so it is computed in a second
    pass over only the top `top_k_tokens` sequences of each query and stored densely with zeros elsewhere.
    """
    names = [q.name for q in inputs.queries]
    numbers = numerical_settings(influence)
    key = config_digest(OmegaConf.create({"influence": numbers, "queries": names, "data": inputs.fingerprint,
                                          "model": inputs.model_fingerprint, "top_k_tokens": top_k_tokens}))
    cache = Path(artifacts) / "scores" / inputs.model_name / key
    core_queries = [Query(q.name, q.prompt, q.completion) for q in inputs.queries]
    if not (cache / "scores.safetensors").exists() and os.environ.get("INFLUENCE_LAB_FIGURES_ONLY"):
        raise FileNotFoundError(f"no saved scores for {inputs.model_name} in {cache}; `make figures` only redraws "
                                "saved results: run the study's own make target first")
    if (cache / "scores.safetensors").exists():
        tensors = load_file(cache / "scores.safetensors")
        manifest = json.loads((cache / "manifest.json").read_text())
        scores = InfluenceScores(manifest["query_names"], manifest["layer_names"], tensors["total"],
                                 tensors["per_layer"], tensors.get("per_token"))
        return InfluenceRun(scores, inputs.encoded["input_ids"], inputs.encoded["attention_mask"], manifest["timings_s"])

    factors_key = config_digest(OmegaConf.create({"influence": numbers, "model": inputs.model_fingerprint}))
    factors_dir = Path(artifacts) / "factors" / inputs.model_name / f"{influence.strategy}-{factors_key}"
    settings = OmegaConf.merge(influence, {"per_token": False})
    run = run_influence(inputs.model, inputs.tokenizer, inputs.encoded, core_queries, settings, factors_dir,
                        data_fingerprint=inputs.fingerprint)
    if top_k_tokens > 0:
        top = sorted({i for q in range(len(names)) for i, _ in run.scores.top(q, top_k_tokens)})
        token_run = run_influence(inputs.model, inputs.tokenizer, inputs.encoded, core_queries,
                                  OmegaConf.merge(influence, {"per_token": True}), factors_dir,
                                  data_fingerprint=inputs.fingerprint, score_indices=top)
        per_token = torch.zeros(len(names), len(inputs.encoded["input_ids"]), token_run.scores.per_token.shape[-1])
        per_token[:, top] = token_run.scores.per_token
        run.scores.per_token = per_token
        run.timings_s["token_scores"] = sum(token_run.timings_s.values())
    save_run(run, cache, OmegaConf.create({"influence": influence, "queries": names}),
             extra={"model": inputs.model_name})
    return run


def scores_frame(run: InfluenceRun, inputs: StudyInputs) -> pd.DataFrame:
    """Long table: one row per (query, training sequence) with its influence, per-layer split and metadata."""
    scores = run.scores
    num_queries, num_train = scores.total.shape
    frame = pd.DataFrame({"query": [n for n in scores.query_names for _ in range(num_train)],
                          "train_index": list(range(num_train)) * num_queries,
                          "influence": scores.total.flatten().numpy()})
    per_layer = scores.per_layer.reshape(num_queries * num_train, -1).numpy()
    for j, layer in enumerate(scores.layer_names):
        frame[f"layer:{layer}"] = per_layer[:, j]
    meta = inputs.train_metadata[["doc_id", "family", "topic", "language", "word_order"]].reset_index(drop=True)
    return frame.join(meta, on="train_index")


def token_overlap(query: WorldQuery, text: str, tokenizer) -> float:
    """Share of the query's distinct tokens (prompt + completion) that also occur in the text."""
    query_tokens = set(tokenizer(query.prompt + query.completion, add_special_tokens=False)["input_ids"])
    text_tokens = set(tokenizer(text, add_special_tokens=False)["input_ids"])
    return len(query_tokens & text_tokens) / max(1, len(query_tokens))


def is_relevant(query: WorldQuery, doc: pd.Series) -> bool:
    """Related by construction: the same fact, or (for queries without facts) the same topic."""
    if query.fact_ids:
        return doc["doc_id"] in query.relevant_doc_ids or bool(set(query.fact_ids) & set(doc["fact_ids"]))
    return doc["topic"] in query.relevant_topics


class StudyOutput:
    """Writes tables and figures to the run folder and to figures/<study>/, with the command that made them."""

    def __init__(self, study: str, run_dir: Path, figures_dir: Path | None):
        self.study, self.run_dir = study, Path(run_dir)
        self.dirs = [self.run_dir] + ([Path(figures_dir)] if figures_dir else [])
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)
        self.written: list[str] = []

    def table(self, name: str, frame: pd.DataFrame, raw: bool = False) -> None:
        """csv + markdown; raw tables (large) go to the run folder only, as parquet."""
        if raw:
            frame.to_parquet(self.run_dir / f"{name}.parquet", index=False)
            return
        for d in self.dirs:
            frame.to_csv(d / f"{name}.csv", index=False)
            (d / f"{name}.md").write_text(frame.to_markdown(index=False, floatfmt=".4g"))
        self.written.append(f"{name}.csv / {name}.md")

    def figure(self, name: str, fig: plt.Figure) -> None:
        for d in self.dirs:
            fig.savefig(d / f"{name}.png", dpi=130, bbox_inches="tight")
            fig.savefig(d / f"{name}.pdf", bbox_inches="tight")
        plt.close(fig)
        self.written.append(f"{name}.png / {name}.pdf")

    def readme(self, description: str, cfg: DictConfig) -> None:
        """figures/<study>/README.md: what each file is and the command that regenerates it."""
        try:
            overrides = " ".join(HydraConfig.get().overrides.task)
        except ValueError:  # composed outside a Hydra app (tests)
            overrides = ""
        command = f"python -m experiments.{self.study} {overrides}".strip()
        text = [f"# {self.study}", "", description, "", "Regenerate with:", "", "```bash", command, "```", "",
                "Files:", ""] + [f"- {w}" for w in self.written] + ["", "Resolved config:", "", "```yaml",
                OmegaConf.to_yaml(cfg).strip(), "```", ""]
        for d in self.dirs:
            (d / "README.md").write_text("\n".join(text))


def verdict(claim: str, statistic: str, value: float, uncertainty: str, holds: bool | None) -> dict:
    """One row of a study's verdict table: the paper's claim and what we measured."""
    return {"paper claim": claim, "statistic": statistic, "measured": value, "uncertainty": uncertainty,
            "holds at our scale": {True: "yes", False: "no", None: "inconclusive"}[holds]}


def world_queries(data: DictConfig) -> list[WorldQuery]:
    return load_queries(Path(data.queries))


def study_queries(cfg: DictConfig) -> list[WorldQuery]:
    """The configured query names, plus the first `held_out_order` forward queries whose order is held out."""
    all_queries = world_queries(cfg.data)
    chosen = select_queries(all_queries, list(cfg.queries.names))
    extra = [q for q in all_queries if q.held_out == "order" and q not in chosen][: int(cfg.queries.get("held_out_order", 0))]
    return chosen + extra


def scored_models(cfg: DictConfig):
    """For each configured model: (StudyInputs, InfluenceRun), scores from the cache when present."""
    queries = study_queries(cfg)
    for name in cfg.models:
        path = cfg.model_paths.get(name) or model_config(name).name_or_path
        inputs = load_study_inputs(name, path, cfg.data, queries)
        yield inputs, cached_influence(inputs, cfg.influence, Path(cfg.artifacts), int(cfg.get("top_k_tokens", 0)))


def top_sequences(inputs: StudyInputs, run: InfluenceRun, k: int, snippet_chars: int = 160) -> pd.DataFrame:
    """The k most influential training sequences of every query, with scores, metadata and a text snippet."""
    metadata = inputs.train_metadata[["doc_id", "family", "topic", "language"]].reset_index(drop=True)
    table = top_sequences_table(run, metadata, inputs.tokenizer, k)
    table["text"] = [inputs.train_texts[i][:snippet_chars].replace("\n", " ") for i in table["train_index"]]
    return table.assign(model=inputs.model_name)


RELATIONS = ("same fact, same language", "same fact, other language", "same topic", "unrelated")


def relation(query: WorldQuery, doc: pd.Series) -> str:
    """How a training document relates to a query by construction (from the world's metadata)."""
    if query.fact_ids and set(query.fact_ids) & set(doc["fact_ids"]):
        return RELATIONS[0] if doc["language"] == query.language else RELATIONS[1]
    if doc["topic"] in query.relevant_topics:
        return RELATIONS[2]
    return RELATIONS[3]


def model_sizes(inputs_list: Sequence[StudyInputs]) -> dict[str, int]:
    """Non-embedding parameters of each model (sizes for the x axis of the scale figures)."""
    sizes = {}
    for inputs in inputs_list:
        embeddings = {id(p) for m in inputs.model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
        head = inputs.model.get_output_embeddings()
        embeddings |= {id(p) for p in head.parameters()} if head is not None else set()
        sizes[inputs.model_name] = sum(p.numel() for p in inputs.model.parameters() if id(p) not in embeddings)
    return sizes
