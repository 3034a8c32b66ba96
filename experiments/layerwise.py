"""Study g: where in the network does influence sit? Layer-wise split of influence per model size.

    python -m experiments.layerwise                  # make layerwise
    python -m experiments.layerwise models=[zoo_m,zoo_l] top_k=100

Paper (Sec 5.3.2, Figs 17-21): averaged over queries influence is spread roughly uniformly over layers;
factual and memorised queries sit in upper layers, math/code/translation in the middle; ranking sequences by
the influence of the lower / middle / upper third of the layers changes the top sequences, and the middle
third gives the most abstract ones (measured here as lower token overlap with the query).
"""

from __future__ import annotations

import hydra
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from analysis.abstraction import split_flagged
from analysis.bootstrap import nested_bootstrap
from analysis.layerwise import (bands, centre_of_mass, kind_difference, layer_shares, middle_minus_others,
                                peak_of_mean_profile, per_block)
from analysis.trends import threshold_verdict
from experiments import pipeline
from experiments.study import (CONFIG_DIR, WORLD_COLUMNS, StudyOutput, focus_queries, is_relevant, run_stage,
                              scored_models, size_groups, token_overlap, top_sequences)

# the zoo's cross_lingual queries are its fact queries asked in Korean / Turkish: factual, not translation tasks
QUERY_KIND = {"facts": "factual", "word_order": "factual", "cross_lingual": "factual", "math": "math/code",
              "code": "math/code", "roleplay": "role-play", "memorisation": "memorised"}


def profile_figure(shares: pd.DataFrame) -> plt.Figure:
    """Fig 17: mean share of influence per block (x uniform share), against relative depth, one line per model."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for model, group in shares.groupby("model", sort=False):
        mean = group.groupby("depth")["relative_share"].agg(["mean", "sem"]).reset_index()
        ax.errorbar(mean["depth"], mean["mean"], yerr=mean["sem"].fillna(0), marker="o", ms=3, capsize=2, label=model)
    ax.axhline(1.0, color="grey", ls=":", lw=1, label="uniform")
    ax.set_xlabel("relative depth of the layer (0 = first, 1 = last)")
    ax.set_ylabel("share of influence x number of layers")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def heatmap_figure(panels: list[tuple[str, str, np.ndarray]]) -> plt.Figure:
    """Fig 18: per (query, model) a layers x top sequences map (sorted by centre of mass), colour = the layer's share
    of the sequence's influence; a grid with one row per query and one column per model, one shared colour scale
    and a colour bar, so 30+ queries stay readable (the figure grows downwards)."""
    queries = list(dict.fromkeys(q for _, q, _ in panels))
    models = list(dict.fromkeys(m for m, _, _ in panels))
    limit = max((float(np.abs(m).max()) for _, _, m in panels), default=1.0) or 1.0
    fig, axes = plt.subplots(len(queries), len(models), figsize=(2.6 * len(models) + 1, 1.6 * len(queries) + 0.6),
                             squeeze=False)
    image = None
    for (model, query, matrix) in panels:
        ax = axes[queries.index(query), models.index(model)]
        image = ax.imshow(matrix, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, origin="lower")
        ax.set_title(f"{query} | {model}", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("top sequences (by centre of mass)", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("layer", fontsize=7)
    for ax in axes.flat:
        if not ax.images:
            ax.axis("off")
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    if image is not None:
        fig.colorbar(image, cax=fig.add_axes((0.92, 0.15, 0.015, 0.7)), label="share of the sequence's influence")
    return fig


def layer_token_figure(maps: list[tuple[str, str, np.ndarray, list[str]]]) -> plt.Figure:
    """Fig 4: one top sequence's influence split over layers (rows) and tokens (columns), with the sums along each
    axis in the margins (right: per-layer influence; top: token-wise influence), one panel per (model, query)."""
    fig = plt.figure(figsize=(9, 2.6 * len(maps) + 0.4))
    grid = fig.add_gridspec(2 * len(maps), 2, width_ratios=(12, 1), height_ratios=[1, 3] * len(maps),
                            hspace=0.5, wspace=0.03)
    for i, (model, query, matrix, tokens) in enumerate(maps):
        limit = float(np.abs(matrix).max()) or 1.0
        main = fig.add_subplot(grid[2 * i + 1, 0])
        image = main.imshow(matrix, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, origin="lower")
        step = max(1, len(tokens) // 30)
        main.set_xticks(range(0, len(tokens), step), [repr(t)[1:-1][:8] for t in tokens[::step]], rotation=90,
                        fontsize=5)
        main.set_ylabel("layer", fontsize=7)
        top = fig.add_subplot(grid[2 * i, 0], sharex=main)
        top.bar(range(matrix.shape[1]), matrix.sum(0), color=np.where(matrix.sum(0) >= 0, "tab:red", "tab:blue"))
        top.set_title(f"{query} | {model}: top sequence (total {matrix.sum():.3g})", fontsize=8)
        top.tick_params(labelbottom=False, labelsize=6)
        side = fig.add_subplot(grid[2 * i + 1, 1], sharey=main)
        side.barh(range(matrix.shape[0]), matrix.sum(1), color=np.where(matrix.sum(1) >= 0, "tab:red", "tab:blue"))
        side.tick_params(labelleft=False, labelsize=6)
        fig.colorbar(image, ax=[main, side], fraction=0.02, pad=0.01)
    return fig


def layer_token_maps(inputs, top_table: pd.DataFrame, focus: list[str], cfg: DictConfig):
    """Per focus query its top sequence that the spurious rule keeps, split over layers and tokens (Fig 4):
    [(model, query, (L, T) matrix, token strings)]."""
    chosen = []
    for query in [q for q in inputs.queries if q.name in focus]:
        rows = top_table[(top_table["query"] == query.name) & (top_table["spurious"] != True)]  # noqa: E712
        if len(rows):
            chosen.append((query, int(rows.iloc[0]["train_id"])))
    if not chosen:
        return []
    ids = [n for _, n in chosen]
    scored = inputs.corpus.subset(ids)
    scoring = pipeline.ScoringSettings(query_rank=None, top_k_tokens=0)
    values = pipeline.layer_token_scores(inputs.loaded, inputs.corpus, [q for q, _ in chosen], cfg.influence,
                                         scoring, cfg.artifacts, scored)  # (Q', N', L, T)
    maps = []
    for i, (query, n) in enumerate(chosen):
        length = int(scored.encoded["attention_mask"][i].sum())
        tokens = [inputs.tokenizer.decode([t]) for t in scored.encoded["input_ids"][i, :length].tolist()]
        maps.append((inputs.model_name, query.name, values[i, i, :, :length], tokens))
    return maps


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="experiment/layerwise")
def main(cfg: DictConfig) -> None:
    run_stage(run, cfg, HydraConfig.get().runtime.output_dir)


def run(cfg: DictConfig, run_dir) -> None:
    """The study on a composed config, writing into run_dir (and figures_dir when set)."""
    out = StudyOutput("layerwise", run_dir, cfg.figures_dir)
    k, pool = int(cfg.top_k), int(cfg.top_k_tokens)
    if pool < k:
        raise ValueError(f"top_k_tokens={pool} < top_k={k}: the spurious rule needs token scores for at least the top "
                         "k candidates; set top_k_tokens >= top_k")
    share_rows, centre_rows, band_rows, panels, maps = [], [], [], [], []
    tops, flagged_all, counts_all = [], [], []
    for inputs, run in scored_models(cfg, out):
        candidates = top_sequences(inputs, run, pool)  # each query's top `pool`, with token scores and the flag
        split = split_flagged(candidates, k)  # the counted top k: positive and not flagged by the spurious rule
        tops.append(candidates.groupby("query", sort=False).head(int(cfg.top_k_shown)))
        flagged_all.append(split.flagged)
        counts_all.append(split.counts)
        maps += layer_token_maps(inputs, candidates, focus_queries(cfg, inputs.queries), cfg)
        block_influence, blocks = per_block(run.scores.per_layer, run.scores.layer_names)  # (Q, N, B)
        depths = np.linspace(0, 1, len(blocks)) if len(blocks) > 1 else np.zeros(1)
        band_map = bands(len(blocks)) if len(blocks) >= 3 else {}
        world = WORLD_COLUMNS <= set(inputs.train_metadata.columns)  # relatedness by construction needs them
        focus = focus_queries(cfg, inputs.queries)
        for q_index, query in enumerate(inputs.queries):
            top = split.kept.loc[split.kept["query"] == query.name, "train_id"].astype(int).tolist()
            if not top:
                continue  # no positive, not-flagged sequence (counted in spurious_counts)
            flagged = set(split.flagged.loc[split.flagged["query"] == query.name, "train_id"].astype(int))
            top_blocks = block_influence[q_index, top]  # (k', B), k' <= k
            for b, share in enumerate(layer_shares(top_blocks).tolist()):
                share_rows.append({"model": inputs.model_name, "query": query.name, "kind": QUERY_KIND.get(query.study, query.study or "query"),
                                   "block": blocks[b], "depth": depths[b], "share": share,
                                   "relative_share": share * len(blocks)})
            centres = centre_of_mass(top_blocks)
            centre_rows.append({"model": inputs.model_name, "query": query.name, "kind": QUERY_KIND.get(query.study, query.study or "query"),
                                "centre_of_mass": float(centres.mean())})
            if query.name in focus:
                order = torch.argsort(centres)
                matrix = (top_blocks[order] / top_blocks.sum(-1, keepdim=True)[order]).T.numpy()
                panels.append((inputs.model_name, query.name, matrix))
            rankings = {"all": run.scores.total[q_index]}
            rankings.update({band: block_influence[q_index][:, idx].sum(-1) for band, idx in band_map.items()})
            for band, values in rankings.items():  # flagged sequences (checked on the whole model's tokens) left out
                ranked = torch.argsort(values, descending=True).tolist()
                chosen = [i for i in ranked[: cfg.top_k_band + len(flagged)] if i not in flagged][: cfg.top_k_band]
                band_rows.append({
                    "model": inputs.model_name, "query": query.name, "band": band,
                    "token_overlap": float(np.mean([token_overlap(query, inputs.train_texts[i], inputs.tokenizer)
                                                    for i in chosen])),
                    "relevant": float(np.mean([is_relevant(query, inputs.train_metadata.iloc[i]) for i in chosen]))
                    if world else float("nan"),
                    "same_top_as_all": len(set(chosen) & set(top[: cfg.top_k_band])) / cfg.top_k_band,
                })
    shares, centres, band_table = pd.DataFrame(share_rows), pd.DataFrame(centre_rows), pd.DataFrame(band_rows)
    out.table("layer_shares", shares)
    out.table("centre_of_mass", centres.groupby(["model", "kind"])["centre_of_mass"].agg(["mean", "sem", "count"])
              .reset_index())
    band_summary = band_table.groupby(["model", "band"], sort=False)[["token_overlap", "relevant", "same_top_as_all"]] \
        .agg(["mean", "sem"]).reset_index()
    band_summary.columns = [" ".join(c).strip() for c in band_summary.columns]
    out.table("bands", band_summary)
    out.figure("layer_profile", profile_figure(shares), paper="Fig 17")
    if panels:
        out.figure("layer_heatmaps", heatmap_figure(panels), paper="Fig 18")
    if maps:
        out.figure("layer_token_maps", layer_token_figure(maps), paper="Fig 4")
        out.table("layer_token_map_margins", pd.DataFrame([
            {"model": m, "query": q, "layer": layer, "influence": float(v)}
            for m, q, matrix, _ in maps for layer, v in enumerate(matrix.sum(1))]))

    rows = layerwise_verdicts(shares, centres, band_table, [i.loaded.record() for i in out.inputs], cfg)
    verdicts = out.verdicts(rows)
    flagged = pd.concat(flagged_all, ignore_index=True).drop(columns=["tokens", "token_scores"])
    out.table("flagged_spurious", flagged.assign(text=flagged["text"].str.slice(0, 160).str.replace("\n", " ")))
    out.table("spurious_counts", pd.concat(counts_all, ignore_index=True))
    out.top_sequences(pd.concat(tops))
    out.readme("Layer-wise influence per model size (paper Figs 17-21): per-layer shares of the top sequences' "
               "influence, heat maps sorted by centre of mass, band-restricted rankings and the verdict table. "
               f"The counted top {k} of each query are its positive sequences that the spurious rule keeps "
               f"(token-wise ||a||_2 / ||a||_1 <= 2/3, checked among its top {pool}); flagged ones are listed in "
               "flagged_spurious, counted in spurious_counts, and left out of every statistic and figure.", cfg)
    print(verdicts.to_markdown(index=False, floatfmt=".3g"))
    print(band_summary.to_markdown(index=False, floatfmt=".3g"))


def layerwise_verdicts(shares: pd.DataFrame, centres: pd.DataFrame, band_table: pd.DataFrame, records,
                       cfg: DictConfig) -> list[dict]:
    """The paper's three layer-wise claims for the largest model size (its training seeds pooled: a bootstrap over
    seeds, then queries; analysis.bootstrap.nested_bootstrap), each judged against cfg.thresholds.

    shares: (model, query, depth, relative_share) rows; centres: (model, query, kind, centre_of_mass);
    band_table: (model, query, band, token_overlap); records: the models' ModelRecords."""
    t, samples = cfg.thresholds, int(cfg.bootstrap_samples)
    label, names = size_groups(records)[-1]
    n_seeds = len(names)
    rows = []

    def judged(claim, statistic, units, function, threshold, direction, needs=""):
        if needs or not any(len(u) for u in units):
            return threshold_verdict(claim, needs or statistic, float("nan"), float("nan"), float("nan"), 1,
                                     n_seeds, threshold, direction)
        ci = nested_bootstrap(units, function, n_resamples=samples, seed=int(cfg.seed))
        return threshold_verdict(claim, statistic, ci.estimate, ci.low, ci.high, 1, n_seeds, threshold, direction)

    profiles = [shares[shares["model"] == m].pivot_table(index="query", columns="depth", values="relative_share",
                                                         sort=False).to_numpy() for m in names]
    rows.append(judged("averaged over queries, influence is spread roughly uniformly over layers",
                       f"{label}: largest block's share of the mean profile over queries / uniform share",
                       profiles, peak_of_mean_profile, float(t.uniform_peak_max), "less"))
    kinds = [centres[(centres["model"] == m) & centres["kind"].isin(["factual", "math/code"])] for m in names]
    units = [np.column_stack([k["centre_of_mass"], (k["kind"] == "factual").astype(float)]) for k in kinds]
    both = all({"factual", "math/code"} <= set(k["kind"]) for k in kinds)
    rows.append(judged("factual queries sit higher in the network than math/code queries",
                       f"{label}: mean centre of mass (relative depth) of factual minus math/code queries", units,
                       kind_difference, float(t.factual_minus_math_min), "greater",
                       "" if both else "needs factual and math/code queries"))
    overlap = [band_table[band_table["model"] == m].pivot_table(index="query", columns="band", values="token_overlap",
                                                                sort=False) for m in names]
    has_bands = all({"lower", "middle", "upper"} <= set(o.columns) for o in overlap)
    rows.append(judged("the middle third of the layers gives the most abstract top sequences",
                       f"{label}: mean over queries of the token overlap of the top {cfg.top_k_band} ranked by the "
                       "middle third minus the lower of the lower / upper thirds' (< 0: middle most abstract)",
                       [o[["lower", "middle", "upper"]].to_numpy() for o in overlap] if has_bands else [],
                       middle_minus_others, float(t.middle_minus_others_max), "less",
                       "" if has_bands else "needs at least 3 layers"))
    return rows


if __name__ == "__main__":
    main()
