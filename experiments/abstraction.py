"""The abstraction study that scale, math_code and roleplay each run on their own query set (paper Sec 5.3.1
and 5.3.5): score every model through the pipeline, apply the spurious rule to each query's top candidates,
measure on any corpus how token-matched the counted top sequences are (analysis/abstraction.py), show them as
the paper does, and write the verdicts. Each study adds only its synthetic-world rows (`world_rows`) and their
figure (`stacked_shares_figure`).
"""

from __future__ import annotations

import textwrap
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Rectangle
from omegaconf import DictConfig

from analysis.abstraction import (bm25_baseline, largest_size_claim, model_summary, query_abstraction, size_trend,
                                  split_flagged)
from experiments import pipeline
from experiments.queries import Query
from experiments.study import WORLD_COLUMNS, StudyInputs, StudyOutput, focus_queries, scored_models, top_sequences
from influence_core.tfidf import BM25Index

SPURIOUS_NOTE = ("Spurious rule (paper): a candidate whose token-wise influences a have ||a||_2/||a||_1 > 2/3 (one "
                 "token dominates) is flagged, listed in flagged_spurious (counts in spurious_counts) and left out of "
                 "the shown top sequences and of every counted statistic; the top k are the first k positive, not "
                 "flagged sequences among the top `top_k_tokens` candidates.")


# ---- which queries -------------------------------------------------------------------------------------------------

def selected_queries(queries: Sequence[Query], studies: Sequence[str]) -> list[Query]:
    """The queries labelled with one of `studies`, and every query without a study label (a plain query file:
    all of it). A file whose labelled queries are all of other studies selects nothing: an error naming the fix."""
    chosen = [q for q in queries if not q.study or q.study in studies]
    if not chosen:
        labels = sorted({q.study for q in queries})
        raise ValueError(f"no query is labelled {list(studies)} or unlabelled (the file has studies {labels}); set "
                         "query_studies=[...] or give queries without a `study` field")
    return chosen


def query_set_note(studies: Sequence[str]) -> str:
    return (f"Queries: on the synthetic world those labelled {list(studies)}; on a plain query file (queries without "
            "a `study` field) every query in the file.")


# ---- the abstraction statistics per (model, query) ----------------------------------------------------------------

@dataclass
class Abstraction:
    per_query: pd.DataFrame  # one row per (model, query): analysis.abstraction.query_abstraction + ids
    summary: pd.DataFrame  # one row per model (smallest first as configured): model_summary
    candidates: pd.DataFrame  # the contract's top_sequences of every model (all queries, flagged included)
    kept: pd.DataFrame  # the counted top sequences (positive, not flagged), selected queries only
    flagged: pd.DataFrame  # flagged candidates of the selected queries
    counts: pd.DataFrame  # spurious counts per (model, query)
    world: pd.DataFrame  # the study's own rows on the synthetic world (empty on a plain corpus)
    inputs: list[StudyInputs]
    queries: list[Query]  # the analysed queries (of the first model; every model sees the same file)
    has_world: bool


WorldRows = Callable[[StudyInputs, Query, pd.DataFrame], list[dict]]


def run_abstraction(cfg: DictConfig, out: StudyOutput, studies: Sequence[str], world_rows: WorldRows | None = None,
                    world_columns: set[str] = WORLD_COLUMNS) -> Abstraction:
    """Score every configured model (the one pipeline), apply the spurious rule to each query's top candidates and
    measure (a)-(c) of analysis/abstraction.py on the selected queries; `world_rows(inputs, query, kept rows)`
    adds the study's synthetic-world rows when the corpus has `world_columns`."""
    k, pool = int(cfg.top_k), int(cfg.top_k_tokens)
    if pool < k:
        raise ValueError(f"top_k_tokens={pool} < top_k={k}: the spurious rule needs token scores for at least the top "
                         "k candidates; set top_k_tokens >= top_k")
    rows, world, tops, kept_all, flagged_all, counts_all, all_inputs = [], [], [], [], [], [], []
    indexes: dict[str, BM25Index] = {}
    queries: list[Query] = []
    has_world = False
    for inputs, run in scored_models(cfg, out):
        all_inputs.append(inputs)
        candidates = top_sequences(inputs, run, pool)
        tops.append(candidates)
        queries = selected_queries(inputs.queries, studies)
        names = [q.name for q in queries]
        split = split_flagged(candidates[candidates["query"].isin(names)], k)
        kept_all.append(split.kept)
        flagged_all.append(split.flagged)
        counts_all.append(split.counts)
        corpus = inputs.corpus
        index = indexes.setdefault(corpus.fingerprint, BM25Index.build(corpus.texts))
        bm25 = index.scores([q.prompt + q.completion for q in queries])
        has_world = world_columns <= set(inputs.train_metadata.columns)
        size = pipeline.non_embedding_parameters(inputs.model)
        for q_index, query in enumerate(queries):
            mine = split.kept[split.kept["query"] == query.name]
            top_ids = mine["train_id"].astype(int).tolist()
            baseline = bm25_baseline(bm25[q_index], top_ids, k).tolist()
            row = query_abstraction(mine["influence"].tolist(), [corpus.texts[i] for i in top_ids],
                                    [corpus.texts[i] for i in baseline], query.prompt + query.completion,
                                    query.completion, n_resamples=int(cfg.bootstrap_samples), seed=int(cfg.seed))
            rows.append({"model": inputs.model_name, "parameters": size, "seed": inputs.loaded.seed or 0,
                         "query": query.name, "study": query.study, **row,
                         "top_train_ids": " ".join(map(str, top_ids)),
                         "baseline_train_ids": " ".join(map(str, baseline))})
            if has_world and world_rows is not None:
                world += [{"model": inputs.model_name, "parameters": size, "seed": inputs.loaded.seed or 0,
                           "query": query.name, "study": query.study, **r} for r in world_rows(inputs, query, mine)]
    per_query = pd.DataFrame(rows)
    summary = model_summary(per_query, n_resamples=int(cfg.bootstrap_samples), seed=int(cfg.seed))
    return Abstraction(per_query, summary, pd.concat(tops, ignore_index=True), pd.concat(kept_all, ignore_index=True),
                       pd.concat(flagged_all, ignore_index=True), pd.concat(counts_all, ignore_index=True),
                       pd.DataFrame(world), all_inputs, queries, has_world)


def n_seeds(summary: pd.DataFrame) -> int:
    return max(1, int(summary["seed"].nunique()))


def abstraction_verdicts(result: Abstraction, cfg: DictConfig, label: str) -> list[dict]:
    """The paper's claims on any corpus: the largest model's top sequences are less token-matched than BM25's
    best matches and draw influence from sequences sharing no completion word; across sizes the overlap difference
    falls, the zero-overlap share rises and the top-1 influence shrinks (trends: underpowered with one seed)."""
    t = cfg.thresholds
    summary = result.summary
    n, seed = int(cfg.bootstrap_samples), int(cfg.seed)
    rows = [
        largest_size_claim(result.per_query, "overlap_difference", f"{label}: the largest model's top sequences share "
                           "fewer of the query's words than its BM25 best matches (paper: the large model's share the "
                           "theme, not the tokens)", "decreasing", float(t.overlap_difference), n_resamples=n, seed=seed),
        largest_size_claim(result.per_query, "zero_overlap_share", f"{label}: part of the largest model's top positive "
                           "influence comes from sequences sharing no content word with the completion", "increasing",
                           float(t.zero_overlap_share), n_resamples=n, seed=seed),
    ]
    alpha = float(t.alpha)
    rows += [
        size_trend(summary, "overlap_difference", f"{label}: larger models' top sequences are less token-matched "
                   "(overlap with the query minus the BM25 baseline's falls with size)", "decreasing",
                   -float(t.trend_correlation), alpha, int(t.min_models), int(cfg.bootstrap_samples), int(cfg.seed)),
        size_trend(summary, "zero_overlap_share", f"{label}: larger models draw more top influence from sequences that "
                   "share no completion word", "increasing", float(t.trend_correlation), alpha, int(t.min_models),
                   int(cfg.bootstrap_samples), int(cfg.seed)),
        size_trend(summary, "top1_influence", f"{label}: top influences shrink with scale (paper: trade 0.681 at 810M, "
                   "0.126 at 52B)", "decreasing", -float(t.trend_correlation), alpha, int(t.min_models),
                   int(cfg.bootstrap_samples), int(cfg.seed)),
    ]
    return rows


def write_abstraction_tables(out: StudyOutput, result: Abstraction) -> None:
    """The tables every abstraction study writes: per query, per model, and the flagged sequences apart."""
    out.table("abstraction_per_query", result.per_query)
    out.table("abstraction_by_model", result.summary)
    columns = ["model", "query", "rank", "train_id", "influence", "single_token_dominance", "text"]
    flagged = result.flagged.reindex(columns=columns)
    flagged["text"] = flagged["text"].astype(str).str.slice(0, 160).str.replace("\n", " ")
    out.table("flagged_spurious", flagged)
    out.table("spurious_counts", result.counts)
    out.top_sequences(result.candidates)


# ---- figures --------------------------------------------------------------------------------------------------------

POSITIVE, NEGATIVE = (0.84, 0.15, 0.16), (0.0, 0.55, 0.55)  # the paper's red / teal shading
FONT_SIZE, WIDTH_CHARS = 7.0, 110
CHAR_W, LINE_H = 0.6021 * FONT_SIZE / 72, 1.5 * FONT_SIZE / 72  # DejaVu Sans Mono advance, line pitch (inches)


def shaded_lines(tokens: Sequence[str], scores: Sequence[float] | None, width: int = WIDTH_CHARS,
                 max_lines: int = 6) -> list[list[tuple[str, float | None]]]:
    """Lay out a sequence's pieces in lines of `width` characters: [[(text, score)]]. A long sequence is shown
    from a little before its most influential piece, with "…" where it is cut."""
    scores = list(scores) if scores is not None else [None] * len(tokens)
    start = 0
    if sum(len(t) for t in tokens) > width * max_lines and any(s is not None for s in scores):
        peak = int(np.argmax([abs(s) if s is not None else 0.0 for s in scores]))
        start, chars = peak, 0
        while start > 0 and chars + len(tokens[start - 1]) <= width * max_lines // 3:
            start -= 1
            chars += len(tokens[start])
    lines: list[list[tuple[str, float | None]]] = [[("…", None)] if start else []]
    column = 1 if start else 0
    for token, score in zip(tokens[start:], scores[start:]):
        for j, part in enumerate(token.replace("\r", "").replace("\t", "    ").split("\n")):
            if j:
                lines.append([])
                column = 0
            while part:
                if column >= width:
                    lines.append([])
                    column = 0
                piece, part = part[: width - column], part[width - column:]
                lines[-1].append((piece, score))
                column += len(piece)
        if len(lines) > max_lines:
            lines = lines[:max_lines]
            lines[-1].append(("…", None))
            break
    return lines


def sequences_figure(kept: pd.DataFrame, queries: Sequence[Query], models: Sequence[str], per_model: int = 3,
                     max_lines: int = 6, title: str = "") -> plt.Figure:
    """The paper's presentation: per query a prompt and a completion box, then per model (smallest first) its top
    `per_model` counted sequences, "Influential Sequence for <model> (Influence = x)", tokens shaded by their
    influence (red positive, teal negative; intensity relative to the sequence's largest |token influence|)."""
    ops: list[tuple] = []  # (kind, x, y, payload) in inches from the top left
    y = LINE_H
    if title:
        ops.append(("text", 0.1, y, title, {"fontsize": 9, "fontweight": "bold"}))
        y += 1.6 * LINE_H
    for query in queries:
        ops.append(("text", 0.1, y, f"Query: {query.name}", {"fontsize": 8.5, "fontweight": "bold"}))
        y += 1.4 * LINE_H
        for label, text, colour in (("Prompt", query.prompt, "#eeeeee"), ("Completion", query.completion, "#ddeeff")):
            wrapped = textwrap.wrap(f"{label}: {text}", WIDTH_CHARS, replace_whitespace=True) or [f"{label}:"]
            ops.append(("box", 0.1, y - LINE_H / 2, (WIDTH_CHARS * CHAR_W + 0.1, len(wrapped) * LINE_H, colour)))
            for line in wrapped:
                ops.append(("mono", 0.15, y, [(line, None)], None))
                y += LINE_H
            y += 0.4 * LINE_H
        for model in models:
            mine = kept[(kept["query"] == query.name) & (kept["model"] == model)].sort_values("rank").head(per_model)
            if mine.empty:
                ops.append(("text", 0.1, y, f"{model}: no positive, not-flagged sequence", {"fontsize": 7,
                                                                                             "style": "italic"}))
                y += 1.3 * LINE_H
            for row in mine.itertuples():
                scores = row.token_scores if isinstance(row.token_scores, (list, np.ndarray)) else None
                note = "" if scores is not None else "  [token-wise influence not kept]"
                ops.append(("text", 0.1, y, f"Influential Sequence for {model} (Influence = {row.influence:.4g})"
                            f"{note}", {"fontsize": 7.5, "fontweight": "bold"}))
                y += 1.2 * LINE_H
                lines = shaded_lines(list(row.tokens), scores, max_lines=max_lines)
                peak = max([abs(s) for line in lines for _, s in line if s is not None] or [0.0]) or 1.0
                for line in lines:
                    ops.append(("mono", 0.15, y, line, peak))
                    y += LINE_H
                y += 0.5 * LINE_H
        y += 0.8 * LINE_H
    width = WIDTH_CHARS * CHAR_W + 0.4
    fig = plt.figure(figsize=(width, y))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(y, 0)
    ax.axis("off")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # glyphs the monospace font lacks (e.g. Hangul) are drawn as boxes
        for kind, x, yy, payload, extra in [op if len(op) == 5 else (*op, None) for op in ops]:
            if kind == "text":
                ax.text(x, yy, payload, va="center", ha="left", parse_math=False, **extra)
            elif kind == "box":
                w, h, colour = payload
                ax.add_patch(Rectangle((x, yy), w, h, facecolor=colour, edgecolor="#999999", lw=0.5))
            else:
                column = 0
                for piece, score in payload:
                    if score is not None and extra and score != 0:
                        strength = min(1.0, abs(score) / extra)
                        ax.add_patch(Rectangle((x + column * CHAR_W, yy - LINE_H / 2), len(piece) * CHAR_W, LINE_H,
                                               facecolor=POSITIVE if score > 0 else NEGATIVE, alpha=0.85 * strength,
                                               lw=0))
                    column += len(piece)
                ax.text(x, yy, "".join(p for p, _ in payload), va="center", ha="left", family="DejaVu Sans Mono",
                        fontsize=FONT_SIZE, parse_math=False)
    return fig


def statistics_figure(summary: pd.DataFrame, label: str) -> plt.Figure:
    """Per model size: the overlap difference vs BM25, the zero-overlap share and the top-1 influence, with their
    bootstrap CIs over queries."""
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    ordered = summary.sort_values("parameters")
    for ax, column, ylabel in zip(axes, ("overlap_difference", "zero_overlap_share", "top1_influence"),
                                  ("query-word overlap: top k - BM25 baseline", "share of top positive influence\n"
                                   "with no completion word", "median top-1 influence")):
        estimate = ordered[column].to_numpy(dtype=float)
        low = np.nan_to_num(estimate - ordered[f"{column}_ci_low"].to_numpy(dtype=float))
        high = np.nan_to_num(ordered[f"{column}_ci_high"].to_numpy(dtype=float) - estimate)
        ax.errorbar(ordered["parameters"], estimate, yerr=[low, high], marker="o", capsize=3)
        for x, yv, name in zip(ordered["parameters"], estimate, ordered["model"]):
            ax.annotate(name, (x, yv), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters")
        ax.set_ylabel(ylabel, fontsize=8)
        if column == "overlap_difference":
            ax.axhline(0.0, color="grey", ls=":", lw=1)
    fig.suptitle(label, fontsize=9)
    fig.tight_layout()
    return fig


def write_abstraction_figures(out: StudyOutput, result: Abstraction, cfg: DictConfig, paper: str, label: str,
                              statistics_name: str = "abstraction_statistics") -> None:
    focus = focus_queries(cfg, result.queries, count=int(cfg.figure.queries))
    shown = [q for q in result.queries if q.name in focus]
    models = [i.model_name for i in result.inputs]
    out.figure("top_sequences_by_size", sequences_figure(result.kept, shown, models, int(cfg.figure.per_model),
                                                         int(cfg.figure.max_lines), f"{label}: {paper}"), paper=paper)
    out.figure(statistics_name, statistics_figure(result.summary, label),
               paper=f"{paper.split(' (')[0]}: our measure of the paper's qualitative claim")


# ---- what every abstraction study writes ---------------------------------------------------------------------------

ON_ANY_CORPUS = ("top_sequences_by_size shows each query's top sequences per model as in the paper (tokens shaded "
                 "red/teal by influence). Measured on any corpus: abstraction_per_query (overlap of the top k with the "
                 "query's words minus that of its k best BM25 matches outside the top k, with a bootstrap CI; the "
                 "share of the top positive influence held by sequences sharing no content word with the "
                 "completion; the top-1 influence), abstraction_by_model (means over queries with bootstrap CIs) and "
                 "trend verdicts across sizes (underpowered with one seed per size).")


def world_trend(cfg: DictConfig, shares: pd.DataFrame, column: str, claim: str) -> dict:
    """A synthetic-world share that should grow with model size: the trend verdict with the study's thresholds."""
    t = cfg.thresholds
    return size_trend(shares, column, claim, "increasing", float(t.trend_correlation), float(t.alpha),
                      int(t.min_models), int(cfg.bootstrap_samples), int(cfg.seed))


def stacked_shares_figure(panels: Sequence[tuple[str, pd.DataFrame]], categories: Sequence[str], ylabel: str,
                          width: float = 4.5) -> plt.Figure:
    """One panel per (title, table with a `model` column and one share column per category): bars per model,
    the categories stacked."""
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.2), sharey=True, squeeze=False)
    for ax, (title, table) in zip(axes.flat, panels):
        bottom = np.zeros(len(table))
        for name in categories:
            ax.bar(table["model"], table[name], bottom=bottom, label=name)
            bottom = bottom + table[name].to_numpy()
        ax.set_title(title, fontsize=8)
    axes.flat[0].set_ylabel(ylabel)
    axes.flat[-1].legend(fontsize=6)
    fig.tight_layout()
    return fig


def start_abstraction(cfg: DictConfig, out: StudyOutput, world_rows: WorldRows, world_columns: set[str],
                      paper: str, label: str, statistics_name: str = "abstraction_statistics"
                      ) -> tuple[Abstraction, list[dict]]:
    """Score, measure, and write the tables, figures and verdict rows every abstraction study shares; returns the
    result and the verdict rows, to which the study adds its synthetic-world ones."""
    result = run_abstraction(cfg, out, list(cfg.query_studies), world_rows, world_columns)
    write_abstraction_tables(out, result)
    write_abstraction_figures(out, result, cfg, paper, label, statistics_name)
    return result, abstraction_verdicts(result, cfg, label)


def finish_abstraction(out: StudyOutput, result: Abstraction, rows: list[dict], cfg: DictConfig, title: str,
                       world_note: str) -> None:
    """The verdict table, the README (title, what is measured on any corpus, the spurious rule, the query set,
    then `world_note`: what the synthetic world adds) and the printed summary."""
    verdicts = out.verdicts(rows, n_seeds=n_seeds(result.summary))
    out.readme(f"{title} {ON_ANY_CORPUS} {SPURIOUS_NOTE} {query_set_note(list(cfg.query_studies))} {world_note}", cfg)
    print(result.summary.to_markdown(index=False, floatfmt=".3g"))
    print(verdicts.to_markdown(index=False, floatfmt=".3g"))
