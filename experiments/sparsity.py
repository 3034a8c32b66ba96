"""Study a: how sparse is influence? Power-law tails and the share held by the top sequences.

    python -m experiments.sparsity                     # make sparsity
    python -m experiments.sparsity models=[zoo_l] tail_fraction=0.05

Paper (Sec 5.2.1, Figs 8-9, Table 1): the influence of the top sequences follows a power law (exponents 2-4.3,
KS p > 0.1 for most queries; compared against exponential, Weibull and other tails), with TF-IDF-filtered and
unfiltered candidate sets, and is spread over many sequences rather than a few memorised ones (top 1% of
sequences hold 12-52% of the positive influence).

Per (model, query) and candidate set (every sequence, and each query's BM25 top `tfidf_top_k`, the paper's
TF-IDF filter applied to the same scores): a power-law MLE fit of the tail with its bootstrap KS p-value and
likelihood-ratio tests against exponential, lognormal, Weibull (stretched exponential) and truncated power law
(analysis/tails.py, Table 1's layout), and the top-k% shares (Fig 9). Queries with the same prompt and
completion are fitted once (the duplicates are listed). Verdicts judge a statistic's bootstrap CI against a
threshold written in the config before the results were seen (analysis/trends.threshold_verdict).
"""

from __future__ import annotations

import hydra
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from analysis.bootstrap import seeded_ci
from analysis.power_law import survival, top_share
from analysis.tails import fit_tail
from analysis.trends import threshold_verdict
from experiments import pipeline
from experiments.study import (CONFIG_DIR, StudyOutput, focus_queries, run_stage, scored_models, scores_frame,
                              top_sequences)
from influence_core.tfidf import tfidf_candidates

CANDIDATE_SETS = ("unfiltered", "tfidf")


def unique_queries(queries) -> tuple[list, list[dict]]:
    """Queries with distinct (prompt, completion), in order, and the duplicates left out (name -> kept name)."""
    kept, seen, duplicates = [], {}, []
    for q in queries:
        key = (q.prompt, q.completion)
        if key in seen:
            duplicates.append({"query": q.name, "same text as": seen[key]})
        else:
            seen[key] = q.name
            kept.append(q)
    return kept, duplicates


def plausible_power_law(fits: pd.DataFrame, ks_threshold: float = 0.1) -> pd.Series:
    """A fit is a plausible power law when its KS p-value exceeds ks_threshold (Clauset et al.) and the power law
    beats the exponential in the likelihood ratio (R > 0)."""
    return (fits["ks_p_value"] > ks_threshold) & (fits["R_vs_exponential"] > 0)


def survival_figure(rows: list[tuple[str, str, dict[str, np.ndarray], object]]) -> plt.Figure:
    """Fig 8: log-log 1 - CDF of positive influences, unfiltered and TF-IDF-filtered, with the power law fitted to
    the unfiltered tail, one panel per (model, query)."""
    cols = max(1, min(4, len(rows)))
    fig, axes = plt.subplots(max(1, -(-len(rows) // cols)), cols, figsize=(3.2 * cols, 2.8 * max(1, -(-len(rows) // cols))),
                             squeeze=False)
    for ax, (model, query, values, fit) in zip(axes.flat, rows):
        for name, colour in zip(CANDIDATE_SETS, ("tab:blue", "tab:orange")):
            if (values[name] > 0).sum() >= 2:
                x, s = survival(values[name])
                ax.loglog(x, s, ".", ms=2, color=colour, label=f"{name} ({len(values[name])})")
        x, _ = survival(values["unfiltered"])
        tail_x = np.geomspace(fit.x_min, x.max(), 50)
        share = fit.tail_size / len(x)
        ax.loglog(tail_x, share * (tail_x / fit.x_min) ** (1 - fit.alpha), "r-",
                  label=f"power law, alpha={fit.alpha:.2f}")
        ax.set_title(f"{query}\n{model} (KS p={fit.ks_p_value:.2f})", fontsize=8)
        ax.set_xlabel("influence", fontsize=7)
        ax.set_ylabel("1 - CDF", fontsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def share_figure(shares: pd.DataFrame) -> plt.Figure:
    """Fig 9: share of the total positive influence held by the top k% of sequences, per query and model."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for (model, query), group in shares.groupby(["model", "query"]):
        ax.plot(group["top_fraction"] * 100, group["share"] * 100, "o-", ms=3, label=f"{model}: {query}")
    ax.set_xscale("log")
    ax.set_xlabel("top k% of training sequences")
    ax.set_ylabel("% of total positive influence")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="experiment/sparsity")
def main(cfg: DictConfig) -> None:
    run_stage(run, cfg, HydraConfig.get().runtime.output_dir)


def run(cfg: DictConfig, run_dir) -> None:
    """The study on a composed config, writing into run_dir (and figures_dir when set)."""
    out = StudyOutput("sparsity", run_dir, cfg.figures_dir)
    fits, shares, panels, raw, skipped, tops, duplicates = [], [], [], [], [], [], []
    for inputs, run in scored_models(cfg, out):
        queries, duplicates = unique_queries(inputs.queries)
        size = pipeline.non_embedding_parameters(inputs.model)
        focus = focus_queries(cfg, queries)
        tops.append(top_sequences(inputs, run, cfg.top_k_tokens))
        raw.append(scores_frame(run, inputs).assign(model=inputs.model_name))
        k = min(int(cfg.tfidf_top_k), len(inputs.corpus))
        candidates = tfidf_candidates(inputs.train_texts, {q.name: q.prompt + q.completion for q in queries}, k)
        names = list(run.scores.query_names)
        for query in queries:
            everything = run.scores.total[names.index(query.name)].double().numpy()
            values = {"unfiltered": everything, "tfidf": everything[np.asarray(candidates[query.name], dtype=int)]}
            fitted = {}
            for candidate_set, chosen in values.items():
                try:
                    fitted[candidate_set] = fit_tail(chosen, tail_fraction=cfg.tail_fraction, min_tail=cfg.min_tail,
                                                     bootstrap_samples=cfg.bootstrap_samples)
                except ValueError as error:  # too few positive influences: reported, not fitted
                    skipped.append({"model": inputs.model_name, "query": query.name, "candidates": candidate_set,
                                    "reason": str(error)})
                    continue
                fits.append({"model": inputs.model_name, "seed": inputs.loaded.seed or 0, "parameters": size,
                             "query": query.name, "candidates": candidate_set,
                             "sequences": len(chosen), "positive": int((chosen > 0).sum()),
                             **fitted[candidate_set].as_row()})
            for fraction, share in top_share(everything, tuple(cfg.top_fractions)).items():
                shares.append({"model": inputs.model_name, "seed": inputs.loaded.seed or 0, "parameters": size,
                               "query": query.name, "top_fraction": fraction, "share": share})
            if query.name in focus and "unfiltered" in fitted:
                panels.append((inputs.model_name, query.name, values, fitted["unfiltered"]))
    fits, shares = pd.DataFrame(fits), pd.DataFrame(shares)
    out.table("scores", pd.concat(raw), raw=True)
    out.table("power_law_fits", fits)  # Table 1 layout, per candidate set
    if skipped:
        out.table("power_law_not_fitted", pd.DataFrame(skipped))
    if duplicates:
        out.table("duplicate_queries", pd.DataFrame(duplicates))
    out.table("top_shares", shares)
    out.figure("influence_tails", survival_figure(panels), paper="Fig 8")
    out.figure("top_shares", share_figure(shares[shares["query"].isin([p[1] for p in panels])]), paper="Fig 9")
    out.verdicts(verdict_rows(fits, shares, cfg))
    out.top_sequences(pd.concat(tops))
    out.readme("Power-law fits of each query's positive influences, unfiltered and TF-IDF-filtered, against "
               "exponential, lognormal, Weibull and truncated power-law tails (paper Figs 8-9, Table 1), the share "
               "held by the top sequences, and the verdicts (bootstrap CIs over queries and models against the "
               "config's thresholds).", cfg)
    print(pd.DataFrame(out.verdict_rows)[["claim", "estimate", "ci_low", "ci_high", "verdict"]]
          .to_markdown(index=False, floatfmt=".3g"))
    print(fits[["model", "query", "candidates", "alpha", "ks_p_value", "R_vs_exponential", "R_vs_lognormal"]]
          .to_markdown(index=False, floatfmt=".3g"))


def seeded(table: pd.DataFrame, values, statistic, cfg: DictConfig):
    """The CI of statistic(values) over the table's (size, query) units, honouring its training seeds
    (analysis.bootstrap.seeded_ci: one seed, a bootstrap over the rows; several, seeds then units)."""
    units = table.assign(unit=table["parameters"].astype(str) + ":" + table["query"], value=np.asarray(values, float))
    return seeded_ci(units, statistic, n_resamples=cfg.ci_resamples)


def verdict_rows(fits: pd.DataFrame, shares: pd.DataFrame, cfg: DictConfig) -> list[dict]:
    """The paper's sparsity claims, each a statistic over the unfiltered (model, query) fits with a bootstrap CI
    over them (over seeds, then fits, where a size has several seeds), judged against cfg.thresholds.
    fits and shares: one row per fit / share with columns model, seed, parameters, query and the values."""
    t = cfg.thresholds
    unfiltered = fits[fits["candidates"] == "unfiltered"] if len(fits) else fits
    frame = unfiltered if len(unfiltered) else shares
    n_models = int(frame["parameters"].nunique()) if len(frame) else 0
    n_seeds = int(frame.groupby("parameters")["seed"].nunique().max()) if len(frame) else 1
    rows = []
    if len(unfiltered):
        plausible = plausible_power_law(unfiltered, t.ks_p_value).to_numpy(dtype=float)
        ci = seeded(unfiltered, plausible, np.mean, cfg)
        rows.append(threshold_verdict(
            "the tail of influences follows a power law", f"share of (model, query) fits with KS p > "
            f"{t.ks_p_value} and R vs exponential > 0 (unfiltered)", ci.estimate, ci.low, ci.high, n_models,
            n_seeds, t.plausible_share, "greater"))
        lognormal = unfiltered["R_vs_lognormal"].to_numpy(dtype=float)
        ci = seeded(unfiltered, (lognormal > 0).astype(float), np.mean, cfg)
        rows.append(threshold_verdict(
            "a power law describes the tail better than a lognormal (ours: the paper compares other tails)",
            "share of fits with R vs lognormal > 0", ci.estimate, ci.low, ci.high, n_models, n_seeds, 0.5, "greater"))
        ci = seeded(unfiltered, unfiltered["alpha"].to_numpy(dtype=float), np.median, cfg)
        rows.append(threshold_verdict("power-law exponents lie between about 2 and 4.3", "median alpha",
                                      ci.estimate, ci.low, ci.high, n_models, n_seeds, tuple(t.alpha_range), "inside"))
    for fraction, threshold, claim in ((0.01, t.top1_share_max, "influence is spread over many sequences, not a few "
                                        "memorised ones (top 1% holds 12-52%)"),
                                       (min(cfg.top_fractions), t.top_smallest_share_max,
                                        "a handful of sequences does not dominate")):
        chosen = shares[shares["top_fraction"] == fraction] if len(shares) else shares
        if len(chosen):
            ci = seeded(chosen, chosen["share"].to_numpy(dtype=float), np.median, cfg)
            rows.append(threshold_verdict(claim, f"median share of positive influence in the top {fraction:.1%}",
                                          ci.estimate, ci.low, ci.high, n_models, n_seeds, threshold, "less"))
    return rows


if __name__ == "__main__":
    main()
