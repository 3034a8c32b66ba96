"""Study b: abstraction vs scale. What do the top influential sequences share with the query, per model size?

    python -m experiments.scale                      # make scale

Paper (Sec 5.3.1): the smaller model's top sequences share tokens with the query, the larger model's share
its theme or meaning; and top influences shrink with scale. We measure, for each query's top sequences, the
share of the query's tokens they contain and how they relate to it by construction (same fact in the same or
another language, same topic, unrelated), per model size.
"""

from __future__ import annotations

import hydra
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from scipy.stats import spearmanr

from experiments.study import (CONFIG_DIR, RELATIONS, StudyOutput, model_sizes, relation, scored_models,
                               token_overlap, top_sequences, verdict)


def scale_figure(summary: pd.DataFrame) -> plt.Figure:
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.3))
    left.errorbar(summary["parameters"], summary["token_overlap"], yerr=summary["token_overlap_sem"], marker="o")
    left.set_xscale("log")
    left.set_xlabel("non-embedding parameters")
    left.set_ylabel("share of query tokens in top sequences")
    bottom = np.zeros(len(summary))
    labels = summary["model"]
    for name in RELATIONS:
        right.bar(labels, summary[name], bottom=bottom, label=name)
        bottom += summary[name].to_numpy()
    right.set_ylabel("share of top sequences")
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="experiment/scale")
def main(cfg: DictConfig) -> None:
    run(cfg, HydraConfig.get().runtime.output_dir)


def run(cfg: DictConfig, run_dir) -> None:
    """The study on a composed config, writing into run_dir (and figures_dir when set)."""
    out = StudyOutput("scale", run_dir, cfg.figures_dir)
    rows, tops, all_inputs = [], [], []
    for inputs, run in scored_models(cfg, out):
        all_inputs.append(inputs)
        tops.append(top_sequences(inputs, run, cfg.top_k_tokens))
        for q_index, query in enumerate(inputs.queries):
            if query.study not in cfg.query_studies:
                continue
            for rank, (i, value) in enumerate(run.scores.top(q_index, cfg.top_k), start=1):
                rows.append({"model": inputs.model_name, "query": query.name, "study": query.study, "rank": rank,
                             "influence": value, "token_overlap": token_overlap(query, inputs.train_texts[i], inputs.tokenizer),
                             "relation": relation(query, inputs.train_metadata.iloc[i])})
    per_sequence = pd.DataFrame(rows)
    sizes = model_sizes(all_inputs)
    summary = per_sequence.groupby("model", sort=False).agg(
        token_overlap=("token_overlap", "mean"), token_overlap_sem=("token_overlap", "sem"),
        top1_influence=("influence", lambda v: float(np.median(v[per_sequence.loc[v.index, "rank"] == 1])))).reset_index()
    shares = pd.crosstab(per_sequence["model"], per_sequence["relation"], normalize="index").reindex(
        columns=list(RELATIONS), fill_value=0.0)
    summary = summary.join(shares, on="model")
    summary.insert(1, "parameters", summary["model"].map(sizes))
    out.table("top_sequence_relations", per_sequence)
    out.table("scale_summary", summary)
    out.figure("abstraction_vs_scale", scale_figure(summary))

    rows = []
    if len(summary) >= 2:
        rho_overlap = spearmanr(summary["parameters"], summary["token_overlap"]).statistic
        related = summary[RELATIONS[0]] + summary[RELATIONS[1]] + summary[RELATIONS[2]]
        rows += [
            verdict("larger models' top sequences share fewer surface tokens with the query",
                    "Spearman(size, token overlap of top sequences)", float(rho_overlap),
                    f"{len(summary)} sizes; overlap {summary['token_overlap'].iloc[0]:.3f} -> "
                    f"{summary['token_overlap'].iloc[-1]:.3f}", bool(rho_overlap < 0)),
            verdict("larger models' top sequences are related by meaning (same fact or topic, any language)",
                    "Spearman(size, share of related top sequences)",
                    float(spearmanr(summary["parameters"], related).statistic),
                    f"share {related.iloc[0]:.3f} -> {related.iloc[-1]:.3f}",
                    bool(spearmanr(summary["parameters"], related).statistic > 0)),
            verdict("top influences shrink with scale", "Spearman(size, median top-1 influence)",
                    float(spearmanr(summary["parameters"], summary["top1_influence"]).statistic),
                    f"{summary['top1_influence'].iloc[0]:.3g} -> {summary['top1_influence'].iloc[-1]:.3g}",
                    bool(spearmanr(summary["parameters"], summary["top1_influence"]).statistic < 0)),
        ]
    else:
        rows.append(verdict("larger models' top sequences are more abstract", "needs at least two model sizes",
                            float("nan"), "", None))
    verdicts = pd.DataFrame(rows)
    verdicts = out.verdicts(verdicts)
    out.top_sequences(pd.concat(tops))
    out.readme("Token overlap and relation (by construction) of each query's top influential sequences, per model "
               "size (paper Sec 5.3.1), and the verdict table.", cfg)
    print(summary.to_markdown(index=False, floatfmt=".3g"))
    print(verdicts.to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
