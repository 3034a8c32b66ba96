"""Throughput of query-batched scoring: time to score Q queries over N sequences / time of one plain
forward + backward pass (all parameter gradients, as in training) over the same N sequences.

    python -m benchmarks.throughput                 # zoo_s if built, else the micro zoo; writes figures/bench/
    python -m benchmarks.throughput --sequences 64 --repeats 3

Scoring = forward, backward to the tracked layers' outputs, and the rank-32 query contraction (factored or dense,
whichever is cheaper per layer; same numbers). Timings interleave the baseline and the scoring per Q and keep the
fastest of `repeats`, so load from other processes affects both alike; the 1-minute load average is recorded.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from benchmarks.setup import FIGURES, as_engine_queries, diverse_queries, load_average, load_bench
from influence_core import (ScoreArguments, compute_scores, encode_queries, iterate_batches, precondition_queries,
                            query_gradients)
from influence_core.lowrank import compress_queries, query_nbytes


def plain_pass(bench, batches) -> float:
    start = time.perf_counter()
    for batch in batches:
        bench.model.zero_grad(set_to_none=True)
        bench.task.training_loss(bench.model, batch).backward()
    bench.model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def scoring_pass(bench, batches, queries, names, per_token: bool) -> float:
    start = time.perf_counter()
    compute_scores(bench.model, bench.layers, bench.task, batches, queries, names,
                   ScoreArguments(per_token=per_token, progress=False))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="auto", choices=["auto", "zoo_s", "micro"])
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    bench = load_bench(args.model)
    for p in bench.model.parameters():
        p.requires_grad_(True)
    chosen = diverse_queries(bench.queries, max(args.queries))
    while len(chosen) < max(args.queries):  # fewer distinct queries than asked: repeat them (cost is what counts)
        chosen = chosen + chosen[: max(args.queries) - len(chosen)]
    encoded = encode_queries(bench.tokenizer, as_engine_queries(chosen))
    gradients = query_gradients(bench.model, bench.layers, bench.task, iterate_batches(encoded, 16), progress=False)
    preconditioned = compress_queries(precondition_queries(gradients, bench.factors), args.rank)
    train = {k: v[: args.sequences] for k, v in bench.encoded.items()}
    batches = iterate_batches(train, args.batch_size)
    tokens = int(train["attention_mask"].sum())
    load_before = load_average()
    plain_pass(bench, batches[:1]), scoring_pass(bench, batches[:1], preconditioned, None, False)  # warm-up

    rows = []
    for count in args.queries:
        subset = {n: (q.select(slice(0, count)) if hasattr(q, "select") else q[:count]) for n, q in preconditioned.items()}
        base, score, score_tokens = [], [], []
        for _ in range(args.repeats):
            base.append(plain_pass(bench, batches))
            score.append(scoring_pass(bench, batches, subset, None, False))
            score_tokens.append(scoring_pass(bench, batches, subset, None, True))
        rows.append({"model": bench.name, "queries": count, "sequences": args.sequences, "tokens": tokens,
                     "query_rank": args.rank, "forward_backward_s": min(base), "scoring_s": min(score),
                     "ratio": min(score) / min(base), "scoring_with_token_scores_s": min(score_tokens),
                     "ratio_with_token_scores": min(score_tokens) / min(base),
                     "query_bytes_per_query": query_nbytes(subset)})
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    FIGURES.mkdir(parents=True, exist_ok=True)
    table.to_csv(FIGURES / f"throughput_{bench.name}.csv", index=False)
    note = (f"\n\nModel {bench.name}, {args.sequences} sequences ({tokens} tokens), batch {args.batch_size}, rank "
            f"{args.rank}, fastest of {args.repeats}; torch threads {torch.get_num_threads()}; 1-min load average "
            f"{load_before} before, {load_average()} after (2-core VM shared with other jobs).\n"
            "ratio = scoring time / plain forward+backward time over the same sequences.\n")
    (FIGURES / f"throughput_{bench.name}.md").write_text(table.round(4).to_markdown(index=False) + note)
    print(table.round(3).to_string(index=False))


if __name__ == "__main__":
    main()
