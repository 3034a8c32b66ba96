"""TF-IDF filter recall: share of each query's true top-100 influential sequences (unfiltered, full-rank EK-FAC)
that the BM25 filter (binary presence, k1 = 1.5, b = 0.75) keeps among its top k, per k.

    python -m benchmarks.tfidf_recall               # zoo_s if built, else micro; writes figures/bench/
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch

from benchmarks.rank_scores import rank_variant_scores
from benchmarks.setup import FIGURES
from influence_core.tfidf import BM25Index, recall_of_top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="auto", choices=["auto", "zoo_s", "micro"])
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--pool", type=int, default=1200)
    parser.add_argument("--top", type=int, default=100)
    parser.add_argument("--k", type=int, nargs="+", default=[100, 200, 300, 600, 900])
    args = parser.parse_args()
    bench, queries, rows, full, _, _ = rank_variant_scores(args.model, args.queries, args.pool)
    top = min(args.top, len(rows) // 4)
    index = BM25Index.build([bench.texts[i] for i in rows])
    ranked = index.top_k([q.prompt + q.completion for q in queries], len(rows))  # (Q, pool) best first
    records = []
    for i, q in enumerate(queries):
        truth = torch.topk(full[i], top).indices.numpy()
        for k in args.k:
            records.append({"query": q.name, "study": q.study, "k": k, "k_share_of_pool": k / len(rows),
                            "recall": recall_of_top(truth, ranked[i, :k])})
    per_query = pd.DataFrame(records)
    table = per_query.groupby("k").agg(k_share_of_pool=("k_share_of_pool", "first"), recall_mean=("recall", "mean"),
                                       recall_min=("recall", "min"), recall_max=("recall", "max")).reset_index()
    table.insert(0, "model", bench.name)
    FIGURES.mkdir(parents=True, exist_ok=True)
    table.to_csv(FIGURES / f"tfidf_recall_{bench.name}.csv", index=False)
    per_query.to_csv(FIGURES / f"tfidf_recall_{bench.name}_per_query.csv", index=False)
    note = (f"\n\nModel {bench.name}; {len(queries)} queries x a pool of {len(rows)} random training sequences "
            f"(the BM25 index is built on the pool). Truth: each query's top {top} by unfiltered full-rank EK-FAC "
            f"influence. Recall = share of them among the filter's top k. Chance level = k / pool.\n")
    (FIGURES / f"tfidf_recall_{bench.name}.md").write_text(table.round(4).to_markdown(index=False) + note)
    print(table.round(3).to_string(index=False))


if __name__ == "__main__":
    main()
