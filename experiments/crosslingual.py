"""Study d: cross-lingual influence. Do translations of a query's most influential English sequences still
influence it? (paper Sec 5.3.1, its cross-lingual part, Figs 15-16)

    python -m experiments.crosslingual translation.file=FILE         # make crosslingual
    influence-lab study crosslingual --model M --data D --queries Q translation.file=FILE

The paper's protocol: for an English query, take the model's top 10 English training sequences, translate them
into Korean and Turkish, recompute the influence of the translations, and draw per model size a 3 x 10 heat map
(rows English / Korean / Turkish, columns the 10 sequences). Paper result: near zero at 810M, rising with scale.

Here, per model and English query:
1. candidates: its `candidates` most influential English training sequences (the `language` column when the
   corpus has one; a corpus without it is taken as English), re-scored with token-wise influence;
2. the top `top_k` (10) that the spurious rule (analysis/spurious: one token holds > 2/3 of ||a||_2/||a||_1) does
   not flag; the flagged ones are counted and skipped;
3. their translations (experiments/translation: a given file or local translation models; never made up),
   scored as candidate sequences with the corpus's factors (pipeline.score_model(scored=...));
4. a 3 x 10 table of influence / mean English influence of the 10 (the heat map, one signed colour scale centred
   at 0 shared by every size), and the statistic of analysis/crosslingual: per language the paired difference
   D = mean_j (translated_j - English_j) / mean English influence (-1: translations have no influence, 0: as
   much as the English), with bootstrap CIs, and its trend over model sizes (queries as blocks).
"""

from __future__ import annotations

import hydra
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from matplotlib.colors import TwoSlopeNorm
from omegaconf import DictConfig, OmegaConf

from analysis.crosslingual import (LANGUAGE_NAMES, pooled_translated_minus_english, relative_grid, size_trend,
                                   translated_minus_english)
from analysis.spurious import is_spurious
from analysis.trends import verdict_row
from experiments import pipeline
from experiments.loading import model_max_length, tokenize_sequences
from experiments.results import write_rows
from experiments.study import (CONFIG_DIR, WORLD_COLUMNS, StudyInputs, StudyOutput, known_label, known_pairs,
                               on_known_facts, run_stage, scored_models, size_groups, top_sequences)
from experiments.translation import Translator, translator_from_config
from influence_core.task import IGNORE_INDEX

PAPER = "Figs 15-16"
NEAR_ZERO = -0.8  # D below this: translations keep under a fifth of the English influence ("near zero")
ZOO_NOTE = ("The synthetic zoo (world v2) renders every document in Korean and Turkish from its sentence structure "
            "(experiments/zoo/translations.py): each sentence in the other language's template of the same meaning "
            "(facts in the same word order; prose, math, code docstrings, dialogue, fiction and essays by hand-written "
            "translations), names in Hangul (Korean) or Turkish spelling, numbers and code identifiers unchanged. "
            "So every top sequence has a translation; a Korean rendering shares no word with an English completion, "
            "a Turkish one no whole word (subword pieces of a name can still coincide).")


# ---- inputs --------------------------------------------------------------------------------------------------------

def english_queries(cfg: DictConfig, queries) -> list:
    """The configured `crosslingual_queries` that are English queries of this run; when none is (your own
    queries), every English query."""
    names = list(cfg.get("crosslingual_queries") or [])
    chosen = [q for q in queries if q.name in names and q.language == "en"]
    chosen = chosen or [q for q in queries if q.language == "en"]
    if not chosen:
        raise ValueError("no English query (language 'en') in the query set; the study needs one")
    return chosen


def english_candidates(inputs: StudyInputs, queries, count: int) -> pd.DataFrame:
    """Per query its `count` most influential English sequences: query, corpus_rank, train_id, corpus_score."""
    frame = inputs.model_scores.frame
    metadata = inputs.corpus.metadata
    english = (metadata["language"] == "en").to_numpy() if "language" in metadata else np.ones(len(inputs.corpus), bool)
    rows = []
    for query in queries:
        own = frame[(frame["query"] == query.name) & english[frame["train_id"].to_numpy()]]
        top = own.sort_values("score", ascending=False, kind="stable").head(count)
        rows += [{"query": query.name, "corpus_rank": rank, "train_id": int(t), "corpus_score": float(s)}
                 for rank, (t, s) in enumerate(zip(top["train_id"], top["score"]), start=1)]
    return pd.DataFrame(rows)


def max_length(inputs: StudyInputs, data: DictConfig) -> int:
    """The corpus's max_length, as load_study_inputs chose it."""
    context = model_max_length(inputs.model)
    return min(int(data.max_length), context) if data.get("max_length") else context


def rescored_max_length(context: int, data: DictConfig) -> int:
    """The length limit of re-scored sequences outside the corpus (translations). A translation may take more tokens
    than its source (Hangul, Turkish suffixes): with an uncut corpus it is scored whole, up to the model's context
    (longer ones are refused with the fix); a cut corpus (data.truncation) cuts it at the corpus's length, as it cut
    the sources."""
    if data.get("truncation") and data.get("max_length"):
        return min(int(data.max_length), context)
    return context


def scored_corpus(texts: list[str], tokenizer, length: int, truncation: bool, name: str) -> pipeline.Corpus:
    """pipeline.corpus_from_texts, but cutting long texts when the corpus itself was cut (data.truncation)."""
    if not truncation:
        return pipeline.corpus_from_texts(texts, tokenizer, length, name)
    encoded = tokenize_sequences(texts, tokenizer, max_length=length, truncation=True)
    encoded.pop("lengths")
    encoded["labels"] = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX)
    return pipeline.Corpus(name, "", "text", texts, pd.DataFrame(index=range(len(texts))), encoded,
                           pipeline.cache_key({"texts": texts, "max_length": length, "truncation": True}))


def rescore(inputs: StudyInputs, cfg: DictConfig, queries, texts: list[str], name: str) -> pd.DataFrame:
    """Scores (query, train_id = index into texts, score, token_scores for every text) of sequences outside
    the corpus, with the corpus's factors (cached like every other score)."""
    scoring = pipeline.ScoringSettings.from_config(OmegaConf.merge(
        {"query_rank": None}, cfg.get("scoring") or {}, {"tfidf": {"top_k": None}, "top_k_tokens": len(texts)}))
    length = rescored_max_length(model_max_length(inputs.model), cfg.data)
    scored = scored_corpus(texts, inputs.tokenizer, length, bool(cfg.data.truncation), name)
    args = (inputs.loaded, inputs.corpus, queries, cfg.influence, scoring, cfg.artifacts)
    if cfg.get("compute", True) is False:
        scores = pipeline.saved_model_scores(*args, scored=scored)
    else:
        scores = pipeline.score_model(*args, progress=bool(cfg.influence.progress), scored=scored)
    return scores.frame


# ---- the protocol --------------------------------------------------------------------------------------------------

def top_english_sequences(candidates: pd.DataFrame, rescored: pd.DataFrame, ids: list[int], top_k: int) -> pd.DataFrame:
    """Per query, the first top_k candidates that the spurious rule does not flag (column 1..top_k), with the
    flagged ones kept as rows of column 0 (for the count); english_score: the re-scored influence."""
    position = {train_id: i for i, train_id in enumerate(ids)}
    lookup = rescored.set_index(["query", "train_id"])
    rows = []
    for query, group in candidates.groupby("query", sort=False):
        column = 0
        for row in group.to_dict("records"):
            if column == top_k:
                break
            scored = lookup.loc[(query, position[row["train_id"]])]
            tokens = scored["token_scores"]
            checked = tokens is not None and len(tokens) > 0
            flagged = bool(is_spurious(np.asarray(tokens, dtype=np.float64))) if checked else False
            column += 0 if flagged else 1
            rows.append({**row, "english_score": float(scored["score"]), "spurious": flagged if checked else None,
                         "column": 0 if flagged else column})
    return pd.DataFrame(rows)


def translate_sequences(texts: dict[int, str], translator: Translator, languages) -> list[dict]:
    """[{train_id, language, text}] for every text the translator can translate, per language."""
    ids = list(texts)
    out = []
    for language in languages:
        flags = translator.translatable([texts[i] for i in ids], language)
        chosen = [i for i, ok in zip(ids, flags) if ok]
        translated = translator.translate([texts[i] for i in chosen], language)
        out += [{"train_id": i, "language": language, "text": t} for i, t in zip(chosen, translated)]
    return out


def model_tables(inputs: StudyInputs, cfg: DictConfig, translator: Translator,
                 languages) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One model's long table (query, column, train_id, language, influence, text) and its coverage rows."""
    queries = english_queries(cfg, inputs.queries)
    candidates = english_candidates(inputs, queries, int(cfg.candidates))
    ids = sorted(candidates["train_id"].unique().tolist())
    texts = inputs.corpus.texts
    rescored = rescore(inputs, cfg, queries, [texts[i] for i in ids], "english candidates")
    chosen = top_english_sequences(candidates, rescored, ids, int(cfg.top_k))
    kept = chosen[chosen["column"] > 0]
    translations = translate_sequences({i: texts[i] for i in sorted(kept["train_id"].unique())}, translator, languages)
    scores: dict[tuple, float] = {}
    if translations:
        frame = rescore(inputs, cfg, queries, [t["text"] for t in translations], "translations")
        for row in frame.itertuples():
            entry = translations[row.train_id]
            scores[(row.query, entry["language"], entry["train_id"])] = float(row.score)
    translated_text = {(t["language"], t["train_id"]): t["text"] for t in translations}
    doc_ids = inputs.corpus.metadata["doc_id"] if "doc_id" in inputs.corpus.metadata else None
    rows, coverage = [], []
    for query in queries:
        mine = kept[kept["query"] == query.name]
        for item in mine.to_dict("records"):
            base = {"model": inputs.model_name, "query": query.name, "column": int(item["column"]),
                    "train_id": int(item["train_id"]),
                    "doc_id": None if doc_ids is None else doc_ids.iloc[int(item["train_id"])]}
            rows.append({**base, "language": "en", "influence": item["english_score"],
                         "corpus_score": item["corpus_score"], "translated": True, "text": texts[item["train_id"]]})
            for language in languages:
                key = (query.name, language, int(item["train_id"]))
                rows.append({**base, "language": language, "influence": scores.get(key, float("nan")),
                             "corpus_score": None, "translated": key in scores,
                             "text": translated_text.get((language, int(item["train_id"])))})
        flags = chosen[chosen["query"] == query.name]["spurious"]
        coverage.append({"model": inputs.model_name, "query": query.name,
                         "candidates_examined": int(len(chosen[chosen["query"] == query.name])),
                         "spurious_excluded": int((flags == True).sum()),  # noqa: E712 (None: unchecked)
                         "spurious_unchecked": int(flags.isna().sum()), "sequences": int(len(mine)),
                         **{f"translated_{language}": int(sum(scores.get((query.name, language, int(t))) is not None
                                                              for t in mine["train_id"])) for language in languages}})
    return pd.DataFrame(rows), pd.DataFrame(coverage)


def grids_of(sequences: pd.DataFrame, languages) -> dict[tuple[str, str], pd.DataFrame]:
    """(model, query) -> languages x columns influence (NaN: no translation)."""
    order = ["en", *languages]
    return {(model, query): group.pivot(index="language", columns="column", values="influence").reindex(order)
            for (model, query), group in sequences.groupby(["model", "query"], sort=False)}


# ---- statistics ----------------------------------------------------------------------------------------------------

def differences_table(grids: dict, sizes: dict[str, int], languages, n_resamples: int) -> pd.DataFrame:
    """D per (model, query, language) and pooled over queries per (model, language)."""
    rows = []
    for model in dict.fromkeys(m for m, _ in grids):
        mine = {query: grid for (m, query), grid in grids.items() if m == model}
        for language in languages:
            entries = [(query, translated_minus_english(grid, language, n_resamples=n_resamples))
                       for query, grid in mine.items()]
            entries.append(("(pooled)", pooled_translated_minus_english(mine, language, n_resamples=n_resamples)))
            for query, d in entries:
                rows.append({"model": model, "parameters": sizes[model], "query": query, "language": language,
                             "difference": d.estimate, "ci_low": d.ci_low, "ci_high": d.ci_high,
                             "translated_relative": d.translated, "english_relative": d.english,
                             "n_sequences": d.n_sequences, "n_queries": d.n_queries})
    return pd.DataFrame(rows)


def crosslingual_verdicts(differences: pd.DataFrame, grids: dict, languages, records, n_resamples: int) -> list[dict]:
    """The paper's two cross-lingual claims. At the smallest size (its training seeds pooled: every (model, query)
    grid a cluster of the bootstrap), D near zero; across sizes, D per query rising with size, tested within
    blocks of (query, training seed) so that sizes are only compared within one seed."""
    groups = size_groups(records)
    label, smallest = groups[0]
    seeds = {r.name: r.seed or 0 for r in records}
    per_query = differences[differences["query"] != "(pooled)"]
    rows = []
    for language in languages:
        name = LANGUAGE_NAMES.get(language, language)
        small = pooled_translated_minus_english({key: grid for key, grid in grids.items() if key[0] in smallest},
                                                language, n_resamples=n_resamples)
        rows.append(verdict_row(
            f"{name} translations of the top English sequences have near-zero influence at the smallest size "
            "(paper: 810M)",
            f"{label}: D = mean over queries and sequences of ({name} - English) influence / mean English "
            f"influence of the query's top sequences (-1: none; 0: as English); near zero: D < {NEAR_ZERO}; CI: "
            f"cluster bootstrap ((model, query), then sequences), {small.n_sequences} translated sequences",
            small.estimate, small.ci_low, small.ci_high, None, n_models=1, n_seeds=len(smallest),
            threshold=NEAR_ZERO, direction="decreasing", min_models=1))
        mine = per_query[per_query["language"] == language]
        blocks = mine["query"] + " | seed " + mine["model"].map(seeds).astype(str)
        trend = size_trend(mine.assign(query=blocks).rename(columns={"parameters": "size", "difference": "value"}))
        n_seeds = max(len(names) for _, names in groups)
        rows.append(verdict_row(
            f"{name} translations' influence relative to English rises with model size",
            f"mean over (query, seed) blocks of Spearman(D per query, log parameters) over {trend.n_models} sizes "
            f"and {trend.n_queries} blocks; p: permutation of sizes within blocks; CI: bootstrap over blocks",
            trend.estimate, trend.ci_low, trend.ci_high, trend.p_value, n_models=trend.n_models, n_seeds=n_seeds,
            threshold=0.0, direction="increasing"))
    return rows


# ---- figures -------------------------------------------------------------------------------------------------------

def shared_norm(grids) -> TwoSlopeNorm:
    """One signed colour scale centred at 0 for every heat map: [-m, m], m the largest |relative influence|."""
    values = np.concatenate([relative_grid(g).to_numpy(dtype=np.float64).ravel() for g in grids] or [np.zeros(1)])
    finite = np.abs(values[np.isfinite(values)])
    m = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    return TwoSlopeNorm(vmin=-m, vcenter=0.0, vmax=m)


def heatmap_figure(query: str, panels: dict[str, pd.DataFrame], norm: TwoSlopeNorm) -> plt.Figure:
    """Per model size a languages x sequences heat map of influence / mean English influence (Figs 15-16); blank
    (grey) cells: no translation."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels) + 1.2, 1.9), squeeze=False)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.85")
    image = None
    for ax, (label, grid) in zip(axes.flat, panels.items()):
        relative = relative_grid(grid)
        image = ax.imshow(np.ma.masked_invalid(relative.to_numpy(dtype=np.float64)), cmap=cmap, norm=norm,
                          aspect="auto")
        ax.set_yticks(range(len(relative.index)), [LANGUAGE_NAMES.get(l, l) for l in relative.index], fontsize=7)
        ax.set_xticks(range(len(relative.columns)), relative.columns, fontsize=7)
        ax.set_xlabel("top English sequence", fontsize=7)
        ax.set_title(label, fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="influence / mean English", shrink=0.9)
    fig.suptitle(f"{query}: top English sequences and their translations", fontsize=9, y=1.05)
    return fig


def differences_figure(differences: pd.DataFrame, languages) -> plt.Figure:
    """Ours: pooled D per model size and language, with its 95% CI."""
    pooled = differences[differences["query"] == "(pooled)"].sort_values("parameters", kind="stable")
    models = list(dict.fromkeys(pooled["model"]))
    fig, ax = plt.subplots(figsize=(5, 3))
    width = 0.8 / max(1, len(languages))
    for j, language in enumerate(languages):
        rows = pooled[pooled["language"] == language].set_index("model").reindex(models)
        x = np.arange(len(models)) + j * width
        low = (rows["difference"] - rows["ci_low"]).clip(lower=0).fillna(0)
        high = (rows["ci_high"] - rows["difference"]).clip(lower=0).fillna(0)
        ax.bar(x, rows["difference"], width, yerr=[low, high], capsize=2, label=LANGUAGE_NAMES.get(language, language))
    ax.set_xticks(np.arange(len(models)) + width * (len(languages) - 1) / 2, models)
    ax.axhline(0, color="black", lw=0.8)
    ax.axhline(-1, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("(translated - English) / mean English")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---- the study -----------------------------------------------------------------------------------------------------

@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="experiment/crosslingual")
def main(cfg: DictConfig) -> None:
    run_stage(run, cfg, HydraConfig.get().runtime.output_dir)


def run(cfg: DictConfig, run_dir) -> None:
    """The study on a composed config, writing into run_dir (and figures_dir when set)."""
    languages = list(cfg.languages)
    translator = translator_from_config(cfg.get("translation"), languages)  # refuse before loading anything
    out = StudyOutput("crosslingual", run_dir, cfg.figures_dir)
    sequences, coverage, tops, world = [], [], [], False
    for inputs, scored in scored_models(cfg, out):
        tops.append(top_sequences(inputs, scored, int(cfg.top_k)))
        table, covered = model_tables(inputs, cfg, translator, languages)
        size = pipeline.non_embedding_parameters(inputs.model)
        sequences.append(table.assign(parameters=size))
        coverage.append(covered.assign(parameters=size))
        world = world or WORLD_COLUMNS <= set(inputs.corpus.metadata.columns)
    sequences, coverage = pd.concat(sequences, ignore_index=True), pd.concat(coverage, ignore_index=True)
    sizes = dict(zip(coverage["model"], coverage["parameters"]))
    grids = grids_of(sequences, languages)

    heatmap = []
    for (model, query), grid in grids.items():
        relative = relative_grid(grid)
        for language, values in relative.iterrows():
            heatmap.append({"model": model, "parameters": sizes[model], "query": query, "language": language,
                            **{str(c): v for c, v in values.items()}})
    norm = shared_norm(grids.values())
    differences = differences_table(grids, sizes, languages, int(cfg.bootstrap_samples))

    for d in out.dirs:
        write_rows(sequences, d / "crosslingual_sequences.jsonl")
    out.tables["crosslingual_sequences"] = "crosslingual_sequences.jsonl"
    out.table("crosslingual_heatmap_table", pd.DataFrame(heatmap))
    out.table("crosslingual_coverage", coverage)
    out.table("crosslingual_differences", differences)
    out.table("crosslingual_colour_scale", pd.DataFrame([{"vmin": norm.vmin, "vcenter": norm.vcenter,
                                                          "vmax": norm.vmax}]))
    by_size = sorted(sizes, key=sizes.get)
    for query in dict.fromkeys(q for _, q in grids):
        panels = {f"{model} ({sizes[model]:,})": grids[(model, query)] for model in by_size if (model, query) in grids}
        out.figure(f"crosslingual_heatmaps_{query}", heatmap_figure(query, panels, norm), paper=PAPER)
    out.figure("crosslingual_differences", differences_figure(differences, languages), paper=f"{PAPER} (summary, ours)")
    records = [i.loaded.record() for i in out.inputs]
    rows = [{**r, "facts": "all facts"} for r in
            crosslingual_verdicts(differences, grids, languages, records, int(cfg.bootstrap_samples))]
    known = known_pairs(out.inputs, float(cfg.known_fact_min_share))
    if known is not None:  # zoo models: the same verdicts on the (model, query) pairs whose fact the model knows
        known_grids = {key: grid for key, grid in grids.items() if key in known}
        mine = differences[on_known_facts(differences, known)]
        rows += [{**r, "facts": known_label(cfg.known_fact_min_share), "n_model_queries": len(known_grids)} for r in
                 crosslingual_verdicts(mine, known_grids, languages, records, int(cfg.bootstrap_samples))]
    verdicts = out.verdicts(rows)
    out.top_sequences(pd.concat(tops))

    per_model = coverage.groupby("model", sort=False).sum(numeric_only=True)
    counts = "; ".join(
        f"{model}: {int(row['spurious_excluded'])} spurious excluded, of {int(row['sequences'])} top sequences "
        + ", ".join(f"{LANGUAGE_NAMES.get(lang, lang)} {int(row[f'translated_{lang}'])}" for lang in languages)
        + " translated" for model, row in per_model.iterrows())
    description = (
        "The paper's cross-lingual protocol (Sec 5.3.1, Figs 15-16): per model and English query, its top "
        f"{int(cfg.top_k)} English training sequences (spurious ones excluded), their translations re-scored "
        "with the corpus's factors, and per size a 3 x 10 heat map of influence / mean English influence on one "
        "colour scale centred at 0 (crosslingual_heatmaps_*; grey: no translation). Paper result: near zero at "
        f"810M, rising with scale. Translations: {translator.description}. Per model ({counts}); per model and "
        "query: crosslingual_coverage. Statistic (ours, analysis/crosslingual.py): D = mean over sequences of "
        "(translated - English) influence / mean English influence, -1 when translations have no influence, 0 when "
        "they have as much, with bootstrap CIs (crosslingual_differences); its trend over sizes with queries as "
        "blocks. With one training seed and few sizes the trend verdict comes out underpowered."
        + (f"\n\n{ZOO_NOTE}" if world else ""))
    out.readme(description, cfg)
    print(coverage.to_markdown(index=False))
    print(differences.to_markdown(index=False, floatfmt=".3g"))
    print(verdicts.to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
