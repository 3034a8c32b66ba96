"""Study d: cross-lingual influence. Do Korean and Turkish renderings of a fact influence the English query?

    python -m experiments.crosslingual               # make crosslingual

Paper (Sec 5.3.3, Figs 15-16): the influence of translated versions of the top English sequences is near zero
for the smallest model and rises with scale. Here: for English queries about a fact, the mean influence of the
documents that state the same fact in Korean and in Turkish, relative to the English documents of that fact,
per model size.
"""

from __future__ import annotations

import hydra
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from scipy.stats import spearmanr

from experiments.study import CONFIG_DIR, StudyOutput, model_sizes, scored_models, top_sequences, verdict

LANGUAGES = ("en", "ko", "tr")


def heatmap_figure(matrices: dict[str, pd.DataFrame]) -> plt.Figure:
    """Per model a languages x facts heat map of same-fact influence relative to English (Figs 15-16)."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.0 * len(matrices), 2.4), squeeze=False)
    for ax, (model, matrix) in zip(axes.flat, matrices.items()):
        ax.imshow(matrix.to_numpy(), cmap="Reds", vmin=0, vmax=1, aspect="auto")
        ax.set_yticks(range(len(matrix.index)), ["English", "Korean", "Turkish"][: len(matrix.index)])
        ax.set_xticks(range(len(matrix.columns)), matrix.columns, rotation=90, fontsize=6)
        ax.set_title(model, fontsize=9)
    fig.tight_layout()
    return fig


def ratio_figure(summary: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5, 3))
    width = 0.38
    x = np.arange(len(summary))
    for j, language in enumerate(("ko", "tr")):
        ax.bar(x + j * width, summary[f"{language}_over_en"], width, yerr=summary[f"{language}_over_en_sem"],
               label={"ko": "Korean", "tr": "Turkish"}[language], capsize=2)
    ax.set_xticks(x + width / 2, summary["model"])
    ax.set_ylabel("same-fact influence relative to English")
    ax.axhline(0, color="black", lw=0.8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="experiment/crosslingual")
def main(cfg: DictConfig) -> None:
    run(cfg, HydraConfig.get().runtime.output_dir)


def run(cfg: DictConfig, run_dir) -> None:
    """The study on a composed config, writing into run_dir (and figures_dir when set)."""
    out = StudyOutput("crosslingual", run_dir, cfg.figures_dir)
    rows, tops, all_inputs = [], [], []
    for inputs, run in scored_models(cfg, out):
        all_inputs.append(inputs)
        tops.append(top_sequences(inputs, run, cfg.top_k_tokens))
        meta = inputs.train_metadata.reset_index(drop=True)
        for q_index, query in enumerate(inputs.queries):
            if query.study != "cross_lingual" or query.language != "en":
                continue
            same_fact = meta["fact_ids"].map(lambda ids: bool(set(ids) & set(query.fact_ids)))
            values = run.scores.total[q_index].numpy()
            row = {"model": inputs.model_name, "query": query.name, "fact": query.fact_ids[0]}
            for language in LANGUAGES:
                chosen = values[(same_fact & (meta["language"] == language)).to_numpy()]
                row[f"{language}_mean"] = float(chosen.mean()) if len(chosen) else float("nan")
                row[f"{language}_documents"] = len(chosen)
            row["ko_over_en"] = row["ko_mean"] / row["en_mean"]
            row["tr_over_en"] = row["tr_mean"] / row["en_mean"]
            rows.append(row)
    per_query = pd.DataFrame(rows)
    sizes = model_sizes(all_inputs)
    summary = per_query.groupby("model", sort=False).agg(
        ko_over_en=("ko_over_en", "mean"), ko_over_en_sem=("ko_over_en", "sem"),
        tr_over_en=("tr_over_en", "mean"), tr_over_en_sem=("tr_over_en", "sem"), queries=("query", "count")).reset_index()
    summary.insert(1, "parameters", summary["model"].map(sizes))
    out.table("same_fact_influence_by_language", per_query)
    out.table("crosslingual_summary", summary)
    matrices = {model: group.set_index("fact")[["en_mean", "ko_mean", "tr_mean"]].div(group.set_index("fact")["en_mean"],
                                                                                      axis=0).T
                for model, group in per_query.groupby("model", sort=False)}
    out.figure("crosslingual_heatmaps", heatmap_figure(matrices))
    out.figure("crosslingual_ratios", ratio_figure(summary))

    translated = (summary["ko_over_en"] + summary["tr_over_en"]) / 2
    if len(summary) >= 2:
        rho = float(spearmanr(summary["parameters"], translated).statistic)
        rows = [verdict("translated sequences' influence grows with model size",
                        "Spearman(size, mean of Korean and Turkish same-fact influence / English)", rho,
                        f"{translated.iloc[0]:.3f} -> {translated.iloc[-1]:.3f} over {len(summary)} sizes", bool(rho > 0))]
    else:
        rows = [verdict("translated sequences' influence grows with model size", "needs at least two model sizes",
                        float("nan"), "", None)]
    rows.append(verdict("translated sequences have near-zero influence in the smallest model",
                        f"{summary['model'].iloc[0]}: (Korean + Turkish) / 2 relative to English",
                        float(translated.iloc[0]), f"sem ko {summary['ko_over_en_sem'].iloc[0]:.3f}",
                        bool(abs(translated.iloc[0]) < 0.2)))
    verdicts = pd.DataFrame(rows)
    verdicts = out.verdicts(verdicts)
    out.top_sequences(pd.concat(tops))
    out.readme("Influence of the same fact's Korean and Turkish documents on English queries, relative to its English "
               "documents, per model size (paper Figs 15-16), and the verdict table.", cfg)
    print(summary.to_markdown(index=False, floatfmt=".3g"))
    print(verdicts.to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
