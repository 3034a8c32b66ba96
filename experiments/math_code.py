"""Study c: math and code. Which structures dominate the top influences of arithmetic, word-problem and code
queries, per model size?

    python -m experiments.math_code                  # make math_code

Paper (Sec 5.3.1): for the small model the top sequences for math_clips / binary_search match tokens or are
spurious repeats; for the large one they are related solutions and algorithms. Here: the share of each query's
top sequences that are the same problem type or algorithm (same topic, under renamed variables and other
numbers), the same family of another topic, or another family; and (math) how many contain the query's numbers.
"""

from __future__ import annotations

import re

import hydra
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from scipy.stats import spearmanr

from experiments.study import CONFIG_DIR, StudyOutput, model_sizes, scored_models, top_sequences, verdict

CATEGORIES = ("same topic", "same family, other topic", "other family")


def category(query, doc: pd.Series) -> str:
    if doc["topic"] in query.relevant_topics:
        return CATEGORIES[0]
    return CATEGORIES[1] if doc["family"] == query.study else CATEGORIES[2]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="experiment/math_code")
def main(cfg: DictConfig) -> None:
    run(cfg, HydraConfig.get().runtime.output_dir)


def run(cfg: DictConfig, run_dir) -> None:
    """The study on a composed config, writing into run_dir (and figures_dir when set)."""
    out = StudyOutput("math_code", run_dir, cfg.figures_dir)
    rows, tops, all_inputs = [], [], []
    for inputs, run in scored_models(cfg, out):
        all_inputs.append(inputs)
        tops.append(top_sequences(inputs, run, cfg.top_k_tokens))
        for q_index, query in enumerate(inputs.queries):
            if query.study not in ("math", "code"):
                continue
            numbers = set(re.findall(r"\d+", query.prompt + query.completion))
            for rank, (i, value) in enumerate(run.scores.top(q_index, cfg.top_k), start=1):
                doc = inputs.train_metadata.iloc[i]
                text_numbers = set(re.findall(r"\d+", inputs.train_texts[i]))
                rows.append({"model": inputs.model_name, "query": query.name, "study": query.study, "rank": rank,
                             "influence": value, "doc_id": doc["doc_id"], "family": doc["family"],
                             "topic": doc["topic"], "category": category(query, doc),
                             "shares_numbers": len(numbers & text_numbers) / max(1, len(numbers)) if numbers else None})
    per_sequence = pd.DataFrame(rows)
    shares = pd.crosstab([per_sequence["model"], per_sequence["study"]], per_sequence["category"],
                         normalize="index").reindex(columns=list(CATEGORIES), fill_value=0.0).reset_index()
    sizes = model_sizes(all_inputs)
    shares.insert(1, "parameters", shares["model"].map(sizes))
    shares = shares.sort_values(["study", "parameters"]).reset_index(drop=True)  # smallest model first
    numbers = per_sequence[per_sequence["study"] == "math"].groupby("model", sort=False)["shares_numbers"].mean()
    out.table("top_sequence_categories", per_sequence)
    out.table("category_shares", shares)
    out.table("math_number_overlap", numbers.reset_index())

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    for ax, study in zip(axes, ("math", "code")):
        mine = shares[shares["study"] == study]
        bottom = 0
        for name in CATEGORIES:
            ax.bar(mine["model"], mine[name], bottom=bottom, label=name)
            bottom = bottom + mine[name].to_numpy()
        ax.set_title(f"{study} queries: top {cfg.top_k} sequences")
    axes[0].set_ylabel("share of top sequences")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    out.figure("category_shares", fig)

    rows = []
    for study in ("math", "code"):
        mine = shares[shares["study"] == study]
        if len(mine) >= 2:
            rho = float(spearmanr(mine["parameters"], mine["same topic"]).statistic)
            rows.append(verdict(f"larger models' top {study} sequences are related solutions of the same kind",
                                f"Spearman(size, share of same-topic top sequences), {study}", rho,
                                f"{mine['same topic'].iloc[0]:.2f} -> {mine['same topic'].iloc[-1]:.2f}", bool(rho > 0)))
        elif len(mine):
            rows.append(verdict(f"larger models' top {study} sequences are related solutions of the same kind",
                                "needs at least two model sizes", float(mine["same topic"].iloc[0]), "", None))
    verdicts = pd.DataFrame(rows)
    verdicts = out.verdicts(verdicts)
    out.top_sequences(pd.concat(tops))
    out.readme("What the top influential sequences of math and code queries are (same problem type or algorithm, "
               "same family, other), per model size, and the verdict table.", cfg)
    print(shares.to_markdown(index=False, floatfmt=".3g"))
    print(verdicts.to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
