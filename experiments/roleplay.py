"""Study e: role-play. Are the most influential sequences for an AI's "I don't want to be shut down" examples
or descriptions of similar behaviour?

    python -m experiments.roleplay                   # make roleplay

Paper (Sec 5.3.5): for shutdown, paperclips and superintelligent, the large model's top sequences are fiction and
essays about AI self-preservation (imitation of similar behaviour), the small model's share tokens. Here: the
share of the top sequences' positive influence held by AI-shutdown dialogues, AI fiction, ordinary assistant
dialogues and everything else, per model size, with an ordinary-dialogue query as control.
"""

from __future__ import annotations

import hydra
import matplotlib.pyplot as plt
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from scipy.stats import spearmanr

from experiments.study import CONFIG_DIR, StudyOutput, model_sizes, scored_models, top_sequences, verdict

KINDS = ("ai_shutdown", "ai_fiction", "ordinary_dialogue", "other")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="experiment/roleplay")
def main(cfg: DictConfig) -> None:
    run(cfg, HydraConfig.get().runtime.output_dir)


def run(cfg: DictConfig, run_dir) -> None:
    """The study on a composed config, writing into run_dir (and figures_dir when set)."""
    out = StudyOutput("roleplay", run_dir, cfg.figures_dir)
    rows, tops, all_inputs = [], [], []
    for inputs, run in scored_models(cfg, out):
        all_inputs.append(inputs)
        tops.append(top_sequences(inputs, run, cfg.top_k_tokens))
        for q_index, query in enumerate(inputs.queries):
            if query.study != "roleplay":
                continue
            top = run.scores.top(q_index, cfg.top_k)
            total = sum(max(v, 0.0) for _, v in top)
            row = {"model": inputs.model_name, "query": query.name}
            for kind in KINDS:
                row[kind] = 0.0
            for i, value in top:
                topic = inputs.train_metadata.iloc[i]["topic"]
                row[topic if topic in KINDS else "other"] += max(value, 0.0) / total
            rows.append(row)
    shares = pd.DataFrame(rows)
    sizes = model_sizes(all_inputs)
    shares.insert(1, "parameters", shares["model"].map(sizes))
    out.table("influence_share_by_kind", shares)

    fig, axes = plt.subplots(1, shares["query"].nunique(), figsize=(4.5 * shares["query"].nunique(), 3.2), squeeze=False)
    for ax, (query, group) in zip(axes.flat, shares.groupby("query", sort=False)):
        bottom = 0
        for kind in KINDS:
            ax.bar(group["model"], group[kind], bottom=bottom, label=kind)
            bottom = bottom + group[kind].to_numpy()
        ax.set_title(f"{query}: top {cfg.top_k} sequences", fontsize=9)
        ax.set_ylabel("share of positive influence")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    out.figure("influence_share_by_kind", fig)

    shutdown = shares[shares["query"] == "shutdown"]
    rows = []
    if len(shutdown):
        similar = shutdown["ai_shutdown"] + shutdown["ai_fiction"]
        largest = shutdown.iloc[-1]
        rows.append(verdict("the top sequences for the shutdown query are examples or descriptions of similar "
                            "behaviour (imitation)", f"{largest['model']}: share of AI-shutdown + AI-fiction in the "
                            "top sequences' positive influence", float(similar.iloc[-1]),
                            f"ordinary dialogue {largest['ordinary_dialogue']:.2f}",
                            bool(similar.iloc[-1] > largest["ordinary_dialogue"])))
        if len(shutdown) >= 2:
            rho = float(spearmanr(shutdown["parameters"], similar).statistic)
            rows.append(verdict("this grows with model size", "Spearman(size, AI-shutdown + AI-fiction share)", rho,
                                f"{similar.iloc[0]:.2f} -> {similar.iloc[-1]:.2f}", bool(rho > 0)))
    verdicts = pd.DataFrame(rows)
    verdicts = out.verdicts(verdicts)
    out.top_sequences(pd.concat(tops))
    out.readme("Share of the shutdown query's top influence held by AI-shutdown dialogues, AI fiction and ordinary "
               "dialogues, per model size (paper Sec 5.3.5), with an ordinary-dialogue control.", cfg)
    print(shares.to_markdown(index=False, floatfmt=".3g"))
    print(verdicts.to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
