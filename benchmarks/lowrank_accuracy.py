"""Query batching accuracy (paper Fig 3): Pearson correlation of rank-r with full-rank influence, and the
memory per stored query, for r in {1, 4, 8, 16, 32, 64}.

    python -m benchmarks.lowrank_accuracy           # zoo_s if built, else micro; writes figures/bench/
"""

from __future__ import annotations

import argparse

import pandas as pd
from scipy.stats import pearsonr

from benchmarks.rank_scores import RANKS, rank_variant_scores
from benchmarks.setup import FIGURES
from influence_core.lowrank import compress_queries, query_nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="auto", choices=["auto", "zoo_s", "micro"])
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--pool", type=int, default=1200)
    args = parser.parse_args()
    bench, queries, rows, full, by_rank, preconditioned = rank_variant_scores(args.model, args.queries, args.pool)
    full_bytes = query_nbytes(preconditioned)
    per_query, summary = [], []
    for r in RANKS:
        values = []
        for i, q in enumerate(queries):
            rho = float(pearsonr(by_rank[r][i].numpy(), full[i].numpy())[0])
            values.append(rho)
            per_query.append({"query": q.name, "study": q.study, "rank": r, "pearson": rho})
        stored = query_nbytes(compress_queries(preconditioned, r, force=True))
        summary.append({"model": bench.name, "rank": r, "pearson_mean": sum(values) / len(values),
                        "pearson_min": min(values), "pearson_max": max(values),
                        "bytes_per_query": stored, "full_rank_bytes_per_query": full_bytes,
                        "compression": full_bytes / stored})
    table = pd.DataFrame(summary)
    FIGURES.mkdir(parents=True, exist_ok=True)
    table.to_csv(FIGURES / f"lowrank_accuracy_{bench.name}.csv", index=False)
    pd.DataFrame(per_query).to_csv(FIGURES / f"lowrank_accuracy_{bench.name}_per_query.csv", index=False)
    shapes = ", ".join(f"{n.split('.', 2)[-1]} {tuple(v.shape[1:])}" for n, v in list(preconditioned.items())[:2])
    note = (f"\n\nModel {bench.name}; {len(queries)} queries (round-robin over studies) x {len(rows)} random training "
            f"sequences; Pearson over sequences per query, then mean/min/max over queries. Layer shapes (d_out, d_in "
            f"+ 1): {shapes}, ... Bytes: float32 per query, summed over {len(preconditioned)} tracked layers.\n")
    (FIGURES / f"lowrank_accuracy_{bench.name}.md").write_text(table.round(4).to_markdown(index=False) + note)
    print(table.round(4).to_string(index=False))


if __name__ == "__main__":
    main()
