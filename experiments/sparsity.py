"""Study a: how sparse is influence? Power-law tails and the share held by the top sequences.

    python -m experiments.sparsity                     # make sparsity
    python -m experiments.sparsity models=[zoo_l] tail_fraction=0.05

Paper (Sec 5.2.1, Figs 8-9, Table 1): the influence of the top sequences follows a power law (exponents 2-4.3,
KS p > 0.1 for most queries) and is spread over many sequences rather than a few memorised ones (top 1% of
sequences hold 12-52% of the positive influence).
"""

from __future__ import annotations

import hydra
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from analysis.power_law import fit_power_law_tail, survival, top_share
from experiments.study import (CONFIG_DIR, StudyOutput, focus_queries, run_stage, scored_models, scores_frame,
                              top_sequences, verdict)


def survival_figure(rows: list[tuple[str, str, np.ndarray, object]]) -> plt.Figure:
    """Fig 8: log-log 1 - CDF of positive influences with the fitted power law, one panel per (model, query)."""
    cols = min(4, len(rows))
    fig, axes = plt.subplots(-(-len(rows) // cols), cols, figsize=(3.2 * cols, 2.8 * -(-len(rows) // cols)),
                             squeeze=False)
    for ax, (model, query, values, fit) in zip(axes.flat, rows):
        x, s = survival(values)
        ax.loglog(x, s, ".", ms=2, color="tab:blue", label="influence")
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
    fits, shares, panels, raw, skipped = [], [], [], [], []
    tops = []
    for inputs, run in scored_models(cfg, out):
        focus = focus_queries(cfg, inputs.queries)
        tops.append(top_sequences(inputs, run, cfg.top_k_tokens))
        frame = scores_frame(run, inputs)
        raw.append(frame.assign(model=inputs.model_name))
        for q_index, query in enumerate(run.scores.query_names):
            values = run.scores.total[q_index].double().numpy()
            try:
                fit = fit_power_law_tail(values, cfg.tail_fraction, cfg.min_tail, cfg.bootstrap_samples)
            except ValueError as error:  # too few positive influences: reported, not fitted
                skipped.append({"model": inputs.model_name, "query": query, "reason": str(error)})
                print(f"sparsity: {inputs.model_name} / {query}: no tail fit ({error})")
                fit = None
            if fit is not None:
                fits.append({"model": inputs.model_name, "query": query, "positive": int((values > 0).sum()),
                             **fit.as_row()})
            for fraction, share in top_share(values, tuple(cfg.top_fractions)).items():
                shares.append({"model": inputs.model_name, "query": query, "top_fraction": fraction, "share": share})
            if query in focus and fit is not None:
                panels.append((inputs.model_name, query, values, fit))
    fits, shares = pd.DataFrame(fits), pd.DataFrame(shares)
    out.table("scores", pd.concat(raw), raw=True)
    out.table("power_law_fits", fits)
    if skipped:
        out.table("power_law_not_fitted", pd.DataFrame(skipped))
    out.table("top_shares", shares)
    out.figure("influence_tails", survival_figure(panels))
    out.figure("top_shares", share_figure(shares[shares["query"].isin(focus)]))

    plausible = (fits["ks_p_value"] > 0.1) & (fits["R_vs_exponential"] > 0)
    top1 = shares[shares["top_fraction"] == 0.01]["share"]
    top01 = shares[shares["top_fraction"] == min(cfg.top_fractions)]["share"]
    verdicts = pd.DataFrame([
        verdict("the tail of influences follows a power law", "share of (model, query) with KS p > 0.1 and R vs "
                "exponential > 0", float(plausible.mean()), f"{int(plausible.sum())} of {len(fits)}",
                bool(plausible.mean() >= 0.5)),
        verdict("power-law exponents lie between about 2 and 4.3", "median alpha (IQR)",
                float(fits["alpha"].median()), f"{fits['alpha'].quantile(0.25):.2f}-{fits['alpha'].quantile(0.75):.2f}",
                bool(2.0 <= fits["alpha"].median() <= 4.5)),
        verdict("influence is spread over many sequences, not a few memorised ones (top 1% holds 12-52%)",
                "median share of positive influence in the top 1%", float(top1.median()),
                f"range {top1.min():.2f}-{top1.max():.2f}", bool(top1.median() <= 0.6)),
        verdict("a handful of sequences does not dominate", f"median share in the top {min(cfg.top_fractions):.1%}",
                float(top01.median()), f"range {top01.min():.2f}-{top01.max():.2f}", bool(top01.median() < 0.5)),
    ])
    verdicts = out.verdicts(verdicts)
    out.top_sequences(pd.concat(tops))
    out.readme("Power-law fits of each query's positive influences (paper Figs 8-9, Table 1), the share held by "
               "the top sequences, and the verdict table.", cfg)
    print(verdicts.to_markdown(index=False, floatfmt=".3g"))
    print(fits[["model", "query", "alpha", "ks_p_value", "R_vs_exponential"]].to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
