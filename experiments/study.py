"""Shared plumbing of the studies: load a model and a corpus, score a query set once per model, save outputs.

Every study follows one line: study config -> StudyInputs per model -> scores from the one pipeline
(experiments/pipeline.py: cached, resumable shards) -> analysis -> tables (csv + md), figures (png + pdf),
verdicts and study.json (experiments/results.py), in the Hydra run folder and in figures/<study>/.
Studies on the same model, corpus and queries share the cached scores; `compute=false` (`make figures`) only
reads them and refuses to compute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from experiments import pipeline  # noqa: E402
from experiments.loading import model_max_length  # noqa: E402
from experiments.queries import Query as WorldQuery  # noqa: E402
from experiments.queries import load_query_file  # noqa: E402
from experiments.results import StudyRecord, verdict_row, write_rows, write_study  # noqa: E402
from influence_core import InfluenceScores  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(REPO / "configs")


@dataclass
class StudyInputs:
    """One model with the corpus and the queries it is studied on, and its scores from the pipeline."""

    loaded: pipeline.LoadedModel
    corpus: pipeline.Corpus
    queries: list[WorldQuery]
    model_scores: pipeline.ModelScores | None = None

    @property
    def model_name(self) -> str:
        return self.loaded.name

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def train_metadata(self) -> pd.DataFrame:
        """Every corpus column but the text; empty of columns for a plain corpus."""
        return self.corpus.metadata

    @property
    def train_texts(self) -> list[str]:
        return self.corpus.texts

    @property
    def encoded(self) -> dict[str, torch.Tensor]:
        return self.corpus.encoded


@dataclass
class InfluenceRun:
    """A model's dense scores of the study's queries over its corpus, with the token ids they refer to."""

    scores: InfluenceScores
    train_input_ids: torch.Tensor  # (N, T), right-padded
    train_attention_mask: torch.Tensor  # (N, T)
    timings_s: dict[str, float] = field(default_factory=dict)


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
            raise KeyError(f"query '{name}' is not in the query set (e.g. {list(by_name)[:5]}); set queries.names")
        chosen.append(by_name[name])
    for q in all_queries:
        if studies and q.study in studies and q not in chosen:
            chosen.append(q)
    if not chosen:
        raise ValueError("no queries selected; set queries.names or queries.studies")
    return chosen


def load_study_inputs(model_name: str, model: DictConfig, data: DictConfig, queries: Sequence[WorldQuery]) -> StudyInputs:
    """The model (its path, dtype, device and seed from configs/model) and the corpus, tokenized for it."""
    loaded = pipeline.load_model(model_name, model.name_or_path, dtype=model.get("dtype", "float32"),
                                 device=model.get("device", "cpu"), seed=model.get("seed"))
    context = model_max_length(loaded.model)
    max_length = min(int(data.max_length), context) if data.get("max_length") else context
    corpus = pipeline.load_corpus(data.path, loaded.tokenizer, max_length, split=data.split,
                                  text_column=data.text_column, truncation=bool(data.truncation))
    return StudyInputs(loaded, corpus, list(queries))


def cached_influence(inputs: StudyInputs, cfg: DictConfig) -> InfluenceRun:
    """Scores of every query over every training sequence through the one pipeline (cached and resumable shards,
    shared by every study whatever its top_k_tokens); token-wise influence for each query's top `top_k_tokens`
    sequences (a small pass of its own, cached per value)."""
    scoring = pipeline.ScoringSettings.from_config(OmegaConf.merge(
        {"query_rank": None, "tfidf": {"top_k": None}}, cfg.get("scoring") or {},
        {"top_k_tokens": int(cfg.get("top_k_tokens", 0))}))
    if cfg.get("compute", True) is False:
        scores = pipeline.saved_model_scores(inputs.loaded, inputs.corpus, inputs.queries, cfg.influence, scoring,
                                             cfg.artifacts)
    else:
        scores = pipeline.score_model(inputs.loaded, inputs.corpus, inputs.queries, cfg.influence, scoring,
                                      cfg.artifacts)
    inputs.model_scores = scores
    width = inputs.encoded["input_ids"].shape[1]
    return InfluenceRun(scores.influence_scores(width), inputs.encoded["input_ids"], inputs.encoded["attention_mask"],
                        scores.timings_s)


def scores_frame(run: InfluenceRun, inputs: StudyInputs) -> pd.DataFrame:
    """Long table: one row per (query, training sequence) with its influence, per-layer split and whichever of the
    corpus's metadata columns exist (none for a plain corpus)."""
    scores = run.scores
    num_queries, num_train = scores.total.shape
    frame = pd.DataFrame({"query": [n for n in scores.query_names for _ in range(num_train)],
                          "train_index": list(range(num_train)) * num_queries,
                          "influence": scores.total.flatten().numpy()})
    per_layer = scores.per_layer.reshape(num_queries * num_train, -1).numpy()
    for j, layer in enumerate(scores.layer_names):
        frame[f"layer:{layer}"] = per_layer[:, j]
    columns = [c for c in ("doc_id", "family", "topic", "language", "word_order") if c in inputs.train_metadata]
    return frame.join(inputs.train_metadata[columns].reset_index(drop=True), on="train_index") if columns else frame


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
    """Writes tables and figures to the run folder and to figures/<study>/, then study.json (the result contract)
    and a README with the command that made them."""

    def __init__(self, study: str, run_dir: Path, figures_dir: Path | None):
        self.study, self.run_dir = study, Path(run_dir)
        self.dirs = [self.run_dir] + ([Path(figures_dir)] if figures_dir else [])
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)
        self.tables: dict[str, str] = {}
        self.figures: dict[str, str] = {}
        self.inputs: list[StudyInputs] = []
        self.paper: dict[str, str] = {}
        self.verdict_rows: list[dict] = []

    def table(self, name: str, frame: pd.DataFrame, raw: bool = False) -> None:
        """csv + markdown; raw tables (large) go to the run folder only, as parquet."""
        if raw:
            frame.to_parquet(self.run_dir / f"{name}.parquet", index=False)
            return
        for d in self.dirs:
            frame.to_csv(d / f"{name}.csv", index=False)
            (d / f"{name}.md").write_text(frame.to_markdown(index=False, floatfmt=".4g"))
        self.tables[name] = f"{name}.csv"

    def top_sequences(self, frame: pd.DataFrame) -> None:
        """The contract's top_sequences table: jsonl (with tokens and token scores) + a csv/md without them."""
        for d in self.dirs:
            write_rows(frame, d / "top_sequences.jsonl")
        readable = frame.drop(columns=["tokens", "token_scores"]).assign(text=frame["text"].str.slice(0, 160)
                                                                          .str.replace("\n", " "))
        self.table("top_sequences_readable", readable)
        self.tables["top_sequences"] = "top_sequences.jsonl"

    def verdicts(self, verdicts: pd.DataFrame | Sequence[dict], n_seeds: int | None = None) -> pd.DataFrame:
        """The verdict table in the contract's shape. A row without its own n_models / n_seeds gets the number of
        model sizes this study scored and `n_seeds`, by default the most training seeds of one size among them
        (size_groups; one for zoo v1 and the plain models)."""
        rows = verdicts.to_dict("records") if isinstance(verdicts, pd.DataFrame) else list(verdicts)
        groups = size_groups([inputs.loaded.record() for inputs in self.inputs])
        n_seeds = n_seeds if n_seeds is not None else max((len(names) for _, names in groups), default=1)
        self.verdict_rows = [verdict_row(**{"n_models": len(groups), "n_seeds": n_seeds, **row}) for row in rows]
        frame = pd.DataFrame(self.verdict_rows)
        self.table("verdicts", frame)
        return frame

    def figure(self, name: str, fig: plt.Figure, paper: str | None = None) -> None:
        """png + pdf; `paper`: the paper's figure it mirrors (recorded in study.json)."""
        for d in self.dirs:
            fig.savefig(d / f"{name}.png", dpi=130, bbox_inches="tight")
            fig.savefig(d / f"{name}.pdf", bbox_inches="tight")
        plt.close(fig)
        self.figures[name] = f"{name}.png"
        if paper:
            self.paper[name] = paper

    def readme(self, description: str, cfg: DictConfig) -> None:
        """figures/<study>/README.md and study.json: what each file is, the command, the verdicts."""
        try:
            overrides = " ".join(HydraConfig.get().overrides.task)
        except ValueError:  # composed outside a Hydra app (tests)
            overrides = ""
        command = cfg.get("command") or f"python -m experiments.{self.study} {overrides}".strip()
        if self.inputs:
            queries = [q for inputs in self.inputs[:1] for q in inputs.queries]
            self.table("queries", pipeline.queries_table(queries))
        files = [f"- {f}" for f in [*self.tables.values(), *self.figures.values()]]
        text = [f"# {self.study}", "", description, "", "Regenerate with:", "", "```bash", command, "```", "",
                "Files (study.json lists them with the models, corpus, settings and verdicts):", ""] + files + [
                "", "Resolved config:", "", "```yaml", OmegaConf.to_yaml(cfg).strip(), "```", ""]
        for d in self.dirs:
            (d / "README.md").write_text("\n".join(text))
        if not self.inputs:
            return
        first = self.inputs[0]
        record = StudyRecord(
            study=self.study, models=[i.loaded.record() for i in self.inputs], corpus=first.corpus.record(),
            queries=[q.name for q in first.queries], settings=OmegaConf.to_container(cfg, resolve=True),
            tables=dict(self.tables), figures=dict(self.figures), verdicts=list(self.verdict_rows), paper=dict(self.paper),
            command=command,
            artifacts={i.model_name: {"factors": str(i.model_scores.factors_dir),
                                      "scores": str(i.model_scores.scores_dir)} for i in self.inputs if i.model_scores})
        for d in self.dirs:
            write_study(d, record)


def verdict(claim: str, statistic: str, value: float, uncertainty: str, holds: bool | None, *,
            ci: tuple[float, float] | None = None, p_value: float | None = None) -> dict:
    """One verdict of a study; StudyOutput.verdicts completes it into the contract's row. Without a CI or p-value
    the point decision (`holds`) makes no verdict: the row says 'inconclusive' and keeps it as `point_decision`."""
    decided = ci is not None or p_value is not None
    word = "inconclusive" if holds is None or not decided else ("holds" if holds else "does not hold")
    return {"claim": claim, "statistic": statistic, "estimate": value, "ci_low": ci[0] if ci else None,
            "ci_high": ci[1] if ci else None, "p_value": p_value, "verdict": word, "uncertainty": uncertainty,
            "point_decision": {True: "yes", False: "no", None: "none"}[holds]}


def study_queries(cfg: DictConfig) -> list[WorldQuery]:
    """The configured query names (all queries of the file when none are named), plus the first `held_out_order`
    forward queries whose order is held out (synthetic world only)."""
    path = cfg.queries.get("path") or cfg.data.get("queries")
    if not path:
        raise ValueError("no query file: give queries.path=FILE (a .json/.jsonl/.yaml list of {name, prompt, "
                         "completion})")
    all_queries = load_query_file(path)
    names = list(cfg.queries.get("names") or [])
    chosen = select_queries(all_queries, names) if names else list(all_queries)
    extra = [q for q in all_queries if q.held_out == "order" and q not in chosen][: int(cfg.queries.get("held_out_order", 0))]
    return chosen + extra


def model_runs(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """(run name, model config) of every configured model, smallest first as listed. A model of configs/model/ is
    run once per training seed in `seeds` (its config's `seed`, which its name_or_path interpolates, e.g.
    artifacts/zoo/zoo_xs/seed${seed}/model), named <model>_s<seed>; `seeds: null` runs the config's own seed once.
    A model given by path (model_paths.<name>=DIR) is run once, as given."""
    runs = []
    paths = cfg.get("model_paths") or {}
    for name in cfg.models:
        if name in paths:
            runs.append((name, OmegaConf.create({"name_or_path": paths[name]})))
            continue
        model = model_config(name)
        seeds = cfg.get("seeds")
        if not seeds:
            runs.append((name, model))
            continue
        if "seed" not in model:
            raise ValueError(f"seeds={list(seeds)} but configs/model/{name}.yaml has no `seed` to set; give "
                             "seeds=null for this model")
        runs += [(f"{name}_s{seed}", OmegaConf.merge(model, {"seed": int(seed)})) for seed in seeds]
    return runs


def model_inputs(cfg: DictConfig, name: str, queries: Sequence[WorldQuery],
                 model: DictConfig | None = None) -> StudyInputs:
    """One configured model (configs/model/<name>.yaml, cfg.model_paths[name], or the given config) with the
    study's corpus."""
    if model is None:
        model = model_config(name) if name not in (cfg.get("model_paths") or {}) else OmegaConf.create(
            {"name_or_path": cfg.model_paths[name]})
    return load_study_inputs(name, model, cfg.data, queries)


def scored_models(cfg: DictConfig, out: StudyOutput | None = None):
    """For each configured model: (StudyInputs, InfluenceRun), scores from the pipeline's cache when present.
    With `out`, each model is recorded for the study's study.json."""
    queries = study_queries(cfg)
    for name, model in model_runs(cfg):
        inputs = model_inputs(cfg, name, queries, model)
        run = cached_influence(inputs, cfg)
        if out is not None:
            out.inputs.append(inputs)
        yield inputs, run


STAGES = ("all", "score", "gather")


def score_stage(cfg: DictConfig) -> None:
    """Score every configured model's corpus (cached, resumable shards); under torchrun each rank its shards."""
    from influence_core import distributed

    queries = study_queries(cfg)
    for name, model in model_runs(cfg):
        inputs = model_inputs(cfg, name, queries, model)
        cached_influence(inputs, cfg)
        if distributed.is_main():
            print(f"scored {name}: {len(queries)} queries, shards in {inputs.model_scores.scores_dir / 'shards'}")


def run_stage(run, cfg: DictConfig, run_dir) -> None:
    """A study's entry point, by `stage`:

    all     score every configured model (cached) and analyse them together (the default);
    score   only score each configured model and stop: one Hydra multirun job per model, e.g.
            `python -m experiments.sparsity -m 'models=[zoo_s],[zoo_l]' stage=score hydra/launcher=joblib`
            (hydra/launcher=submitit_slurm on a cluster);
    gather  analyse the saved scores of every configured model, computing nothing (compute=false):
            `python -m experiments.sparsity 'models=[zoo_s,zoo_l]' stage=gather` draws the cross-size figures.

    Under torchrun (`torchrun --nproc_per_node N -m experiments.sparsity ...`) the ranks fit the factors and
    score the corpus shards together; then rank 0 alone analyses the saved scores (the study's extra, small
    scoring passes, e.g. probes or translations, run there in one process) and writes the results.
    """
    import torch.distributed as dist

    from influence_core import distributed

    stage = cfg.get("stage", "all")
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: use one of {list(STAGES)}")
    if distributed.init_from_environment():
        if stage != "gather":
            score_stage(cfg)
        distributed.barrier()
        dist.destroy_process_group()
        if not distributed.is_main():
            return
    elif stage == "score":
        score_stage(cfg)
    if stage == "score":
        print(f"stage=score done for {list(cfg.models)}; draw the figures with stage=gather and every model listed")
        return
    if stage == "gather":
        OmegaConf.set_struct(cfg, False)
        cfg.compute = False
    run(cfg, run_dir)


def top_sequences(inputs: StudyInputs, run: InfluenceRun, k: int) -> pd.DataFrame:
    """The k most influential training sequences of every query (the contract's columns, see pipeline)."""
    return pipeline.top_sequences(inputs.model_scores, inputs.corpus, k)


WORLD_COLUMNS = {"doc_id", "fact_ids", "topic"}  # the synthetic world's metadata: relatedness by construction


def focus_queries(cfg: DictConfig, queries: Sequence[WorldQuery], count: int = 6) -> list[str]:
    """The config's focus queries that are in this run's query set; when none is (your own queries), the first
    `count` queries, so a figure never comes out empty."""
    names = [q.name for q in queries]
    chosen = [n for n in cfg.get("focus_queries") or [] if n in names]
    return chosen or names[:count]


RELATIONS = ("same fact, same language", "same fact, other language", "same topic", "unrelated")


def relation(query: WorldQuery, doc: pd.Series) -> str:
    """How a training document relates to a query by construction (from the world's metadata)."""
    if query.fact_ids and set(query.fact_ids) & set(doc["fact_ids"]):
        return RELATIONS[0] if doc["language"] == query.language else RELATIONS[1]
    if doc["topic"] in query.relevant_topics:
        return RELATIONS[2]
    return RELATIONS[3]


def size_groups(records: Sequence) -> list[tuple[str, list[str]]]:
    """Models that are training seeds of one size grouped, smallest first: [(label, model names)].

    records: ModelRecord-like (name, architecture, non_embedding_parameters, seed). Models share a group when
    they have the same architecture and parameter count and distinct known seeds; any other model (a seed not
    given, or repeated) is a group of its own. The label is the model's name, or for several seeds
    "<n> seeds of <architecture> <parameters> (<names>)"."""
    groups: dict[tuple, list] = {}
    for r in records:
        groups.setdefault((r.non_embedding_parameters, r.architecture), []).append(r)
    out = []
    for (size, architecture), members in sorted(groups.items(), key=lambda item: item[0][0]):
        seeds = [m.seed for m in members]
        if len(members) > 1 and None not in seeds and len(set(seeds)) == len(seeds):
            names = [m.name for m in members]
            out.append((f"{len(names)} seeds of {architecture} {size:,} ({', '.join(names)})", names))
        else:
            out += [(m.name, [m.name]) for m in members]
    return out


KNOWN_FACTS_FILE = "known_facts.json"  # written by `make zoo` beside each model folder (experiments/zoo/build.py)


def known_fact_ids(inputs: StudyInputs, min_share: float) -> set[str] | None:
    """Facts this model knows: those whose competence paraphrases it answers in at least ``min_share`` of cases,
    read from known_facts.json beside the model folder (fact id -> share answered). None when the model has no such
    file (any model not built by `make zoo`): the study then reports on all facts only."""
    path = Path(inputs.loaded.path).parent / KNOWN_FACTS_FILE
    if not path.exists():
        return None
    shares = json.loads(path.read_text())
    return {fact for fact, share in shares.items() if share >= min_share}


def known_pairs(inputs_list: Sequence[StudyInputs], min_share: float) -> set[tuple[str, str]] | None:
    """(model, query) pairs whose query asks about facts the model knows (every fact of the query known); None when
    no model has known_facts.json. Queries without facts are never in the set."""
    pairs, any_known = set(), False
    for inputs in inputs_list:
        known = known_fact_ids(inputs, min_share)
        if known is None:
            continue
        any_known = True
        pairs |= {(inputs.model_name, q.name) for q in inputs.queries if q.fact_ids and set(q.fact_ids) <= known}
    return pairs if any_known else None


def known_label(min_share: float) -> str:
    """How the verdicts restricted to known_pairs name their subset (the `facts` column)."""
    return f"facts the model knows (>= {min_share:g} of its competence paraphrases)"


def on_known_facts(frame: pd.DataFrame, known: set[tuple[str, str]]) -> pd.Series:
    """Rows of a table with `model` and `query` columns whose (model, query) pair is in `known` (known_pairs)."""
    return pd.Series([(m, q) in known for m, q in zip(frame["model"], frame["query"])], index=frame.index, dtype=bool)


def model_sizes(inputs_list: Sequence[StudyInputs]) -> dict[str, int]:
    """Non-embedding parameters of each model (sizes for the x axis of the scale figures)."""
    return {inputs.model_name: pipeline.non_embedding_parameters(inputs.model) for inputs in inputs_list}
