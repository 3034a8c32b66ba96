"""What pooling training batches for the dense contraction saves (issue 19 item 2; figures/bench/README.md,
"Pooled contraction").

    python -m benchmarks.pooled_scores --model gpt2_m --queries 128

Two measurements in this one-thread process, CPU seconds:
1. the product of one layer's Q queries with n per-sequence gradients, (Q, P) x (P, n), per sequence, for
   n = 16 .. 256 (P the workload's largest tracked layer): the queries are streamed from memory once per product,
   so small n is bound by memory, not arithmetic;
2. `compute_scores` on the workload's N training sequences in its batches, each batch contracted on its own
   (ScoreArguments(pool_bytes=0), the default) against pools of `--pool-mib` MiB, interleaved, `--repeats` times,
   each with its peak RSS above the call's start (VmHWM reset first), and the largest difference between a pooled
   and the batch-by-batch score table. Nothing is written.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.peer_systems import QUERY_BATCH, peak_rss_mb, reset_peaks
from benchmarks.workloads import MODELS, Workload, load_workload
from influence_core import (CausalLMTask, FactorArguments, ScoreArguments, compute_scores, fit_factors,
                            iterate_batches, query_gradients, track_layers)
from influence_core.batch import return_freed_host_memory


def product_seconds(num_queries: int, numbers: int, rows: int, work: int = 4096) -> float:
    """CPU seconds per sequence of (Q, P) x (P, n) products, over `work` sequences."""
    queries, gradients = torch.randn(num_queries, numbers), torch.randn(rows, numbers)
    queries @ gradients.T
    repeats = max(1, work // rows)
    start = time.process_time()
    for _ in range(repeats):
        queries @ gradients.T
    return (time.process_time() - start) / (repeats * rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="gpt2_m")
    parser.add_argument("--sequences", type=int, default=1000)
    parser.add_argument("--queries", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pool-mib", type=int, nargs="+", default=[16, 32, 64],
                        help="the pooled runs' ScoreArguments.pool_bytes, in MiB")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    loaded = load_workload(Workload(args.model, args.sequences, 64, 16))
    model, task = loaded.model, CausalLMTask()
    layers = track_layers(model)
    largest = max(layers, key=lambda l: l.num_parameters)
    for q in args.queries:
        cells = ", ".join(f"n = {n}: {product_seconds(q, largest.num_parameters, n) * 1e3:.3f}"
                          for n in (16, 32, 64, 128, 256))
        print(f"Q = {q}, {largest.name} ({largest.out_features} x {largest.input_dim}), ms per sequence: {cells}",
              flush=True)
    factors = fit_factors(model, layers, task, iterate_batches(loaded.train, 16),
                          FactorArguments(strategy="ekfac", progress=False))
    for q in args.queries:
        _, encoded = loaded.encoded_queries(q)
        queries = query_gradients(model, layers, task, iterate_batches(encoded, QUERY_BATCH, by_length=True),
                                  progress=False, factors=factors)
        print(f"Q = {q}: queries {sum(t.numel() * t.element_size() for t in queries.values()) / 2**20:.1f} MiB",
              flush=True)
        results = {}
        for _ in range(args.repeats):
            for mib in [0, *args.pool_mib]:
                return_freed_host_memory()
                reset_peaks()
                start_rss, start = peak_rss_mb(), time.process_time()
                scores = compute_scores(model, layers, task, iterate_batches(loaded.train, 16), queries,
                                        args=ScoreArguments(progress=False, pool_bytes=mib * 2**20))
                seconds = time.process_time() - start
                label = "each batch alone" if mib == 0 else f"pool {mib} MiB"
                print(f"  {label:16s} {seconds:6.2f} s CPU, peak {peak_rss_mb() - start_rss:+5.0f} MiB over its start "
                      f"({start_rss:.0f} MiB)", flush=True)
                results[mib] = scores.total
        worst = max(float((results[mib] - results[0]).abs().max() / results[0].abs().max()) for mib in args.pool_mib)
        print(f"  largest difference {worst:.1e} of the largest score", flush=True)


if __name__ == "__main__":
    main()
