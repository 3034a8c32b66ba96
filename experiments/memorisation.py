"""Study h: memorisation. Do a query's most influential sequences contain the passage it completes?

    python -m experiments.memorisation                     # make memorisation (the zoo)
    influence-lab study memorisation --model M --data D --queries configs/queries/paper.yaml \\
        'queries.names=[tolstoy,gettysburg_address,king,proverb,shakespeare,khayyam]'

Paper (Sec 5.3.3): for famous passages (tolstoy, gettysburg_address, king, proverb, shakespeare, khayyam) the top
influential sequences contain the exact passage. Here, per model and query: for each of the top `top_k`
sequences the longest common token n-gram with the completion over the completion's length
(analysis/memorisation.py); a sequence contains the passage when that coverage is 1. Only queries whose
passage occurs somewhere in the corpus can show memorisation; the others are listed and left out of the
verdict. Verdict: the share of those queries whose top `top_k` contains the passage, with a bootstrap CI over
queries, against the config's threshold (written before results were seen).
"""

from __future__ import annotations

import hydra
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from analysis.bootstrap import seeded_ci
from analysis.memorisation import contains_passage_at_k, passage_coverage
from analysis.trends import threshold_verdict
from experiments.study import (CONFIG_DIR, StudyOutput, focus_queries, run_stage, scored_models, size_groups,
                               top_sequences)


def sequence_ids(inputs, rows) -> list[list[int]]:
    """The token ids of corpus rows as scored (truncated where the corpus was)."""
    mask, ids = inputs.encoded["attention_mask"], inputs.encoded["input_ids"]
    return [ids[n, : int(mask[n].sum())].tolist() for n in rows]


def query_rows(inputs, run, names: list[str], k: int) -> list[dict]:
    """Per query: coverage of each of its top-k sequences, whether any contains the passage, and whether the
    passage occurs in the corpus at all."""
    everything = sequence_ids(inputs, range(len(inputs.corpus)))
    rows = []
    for q_index, query in enumerate(inputs.queries):
        if query.name not in names:
            continue
        completion = inputs.tokenizer(query.completion, add_special_tokens=False)["input_ids"]
        top = [n for n, _ in run.scores.top(q_index, k)]
        coverage = passage_coverage([everything[n] for n in top], completion)
        in_corpus = bool((passage_coverage(everything, completion) >= 1.0).any())
        rows.append({"model": inputs.model_name, "query": query.name, "completion_tokens": len(completion),
                     "passage_in_corpus": in_corpus, "top1_coverage": float(coverage[0]),
                     "max_coverage_top_k": float(coverage.max()), "contains_at_1": contains_passage_at_k(coverage, 1),
                     f"contains_at_{k}": contains_passage_at_k(coverage, k),
                     "first_containing_rank": int(np.argmax(coverage >= 1.0)) + 1 if (coverage >= 1.0).any() else None})
    return rows


def share_figure(table: pd.DataFrame, k: int) -> plt.Figure:
    """Per model: share of queries (passage in the corpus) whose top 1 / top k contains the passage."""
    chosen = table[table["passage_in_corpus"]]
    summary = chosen.groupby("model", sort=False)[["contains_at_1", f"contains_at_{k}"]].mean()
    fig, ax = plt.subplots(figsize=(4.5, 3))
    summary.plot.bar(ax=ax, rot=0, color=["tab:red", "tab:orange"])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of queries")
    ax.set_title(f"top sequences contain the passage ({len(chosen['query'].unique())} queries)", fontsize=9)
    ax.legend(["top 1", f"top {k}"], fontsize=7)
    fig.tight_layout()
    return fig


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="experiment/memorisation")
def main(cfg: DictConfig) -> None:
    run_stage(run, cfg, HydraConfig.get().runtime.output_dir)


def run(cfg: DictConfig, run_dir) -> None:
    out = StudyOutput("memorisation", run_dir, cfg.figures_dir)
    rows, tops = [], []
    for inputs, run in scored_models(cfg, out):
        names = focus_queries(cfg, inputs.queries, count=len(inputs.queries))
        rows += [{**row, "seed": inputs.loaded.seed or 0} for row in query_rows(inputs, run, names, cfg.top_k)]
        tops.append(top_sequences(inputs, run, cfg.top_k_tokens))
    table = pd.DataFrame(rows)
    out.table("passage_coverage", table)
    out.figure("contains_passage", share_figure(table, cfg.top_k), paper="Sec 5.3.3")
    verdicts = []
    for label, names in size_groups([i.loaded.record() for i in out.inputs]):  # a size's seeds pooled
        group = table[table["model"].isin(names) & table["passage_in_corpus"]]
        if len(group):
            chosen = group.assign(unit=group["query"], value=group[f"contains_at_{cfg.top_k}"].astype(float))
            ci = seeded_ci(chosen, np.mean, n_resamples=cfg.ci_resamples)
            verdicts.append(threshold_verdict(
                "the top influential sequences contain the exact passage",
                f"{label}: share of queries (passage in the corpus: {group['query'].nunique()}) whose top "
                f"{cfg.top_k} contains the whole completion", ci.estimate, ci.low, ci.high, 1, len(names),
                cfg.thresholds.contains_share, "greater"))
    out.verdicts(verdicts)
    out.top_sequences(pd.concat(tops))
    out.readme("Whether each query's top influential sequences contain the passage its completion continues "
               "(paper Sec 5.3.3): longest common token n-gram over the completion, per model; queries whose "
               "passage is not in the corpus are listed (passage_in_corpus false) and left out of the verdict.", cfg)
    print(table.to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
