"""What grouping query batches by length saves (issue 19; figures/bench/README.md, "Query batches by length").

    python -m benchmarks.query_lengths --model gpt2_m --queries 128

Fits the bench workload's factors, then times `query_gradients` on the same Q queries in the peer harness's batches
(`peer_systems.QUERY_BATCH`, 32), as given and grouped by length (`iterate_batches(..., by_length=True)`), raw and
preconditioned, the variants interleaved, `--repeats` times (CPU seconds of this one-thread process), and prints the
token positions each batching pays for (rows x the batch's longest row, summed over batches) and the largest
difference between the two results. Nothing is written.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.peer_systems import QUERY_BATCH
from benchmarks.workloads import MODELS, Workload, load_workload
from influence_core import CausalLMTask, FactorArguments, fit_factors, iterate_batches, query_gradients, track_layers


def padded_positions(batches) -> int:
    """Token positions a pass over these batches computes: rows x longest real row, per batch."""
    return sum(int(b["attention_mask"].shape[0] * b["attention_mask"].sum(dim=1).max()) for b in batches)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="gpt2_m")
    parser.add_argument("--queries", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    loaded = load_workload(Workload(args.model, 1000, 64, 16))
    model, task = loaded.model, CausalLMTask()
    layers = track_layers(model)
    factors = fit_factors(model, layers, task, iterate_batches(loaded.train, 16),
                          FactorArguments(strategy="ekfac", progress=False))
    _, encoded = loaded.encoded_queries(args.queries)
    lengths = encoded["attention_mask"].sum(dim=1)
    print(f"{args.model}: {args.queries} queries of {int(lengths.min())}-{int(lengths.max())} tokens "
          f"(mean {float(lengths.float().mean()):.1f}); token positions in batches of {QUERY_BATCH}: as given "
          f"{padded_positions(iterate_batches(encoded, QUERY_BATCH))}, grouped by length "
          f"{padded_positions(iterate_batches(encoded, QUERY_BATCH, by_length=True))}")
    results = {}
    for _ in range(args.repeats):
        for preconditioned in (False, True):
            for by_length in (False, True):
                start = time.process_time()
                batches = iterate_batches(encoded, QUERY_BATCH, by_length=by_length)
                result = query_gradients(model, layers, task, batches, progress=False,
                                         factors=factors if preconditioned else None)
                seconds = time.process_time() - start
                what, how = "preconditioned" if preconditioned else "raw", "by length" if by_length else "as given"
                print(f"{what:14s} {how:9s} {seconds:6.2f} s CPU", flush=True)
                results[preconditioned, by_length] = result
                del result
    for preconditioned in (False, True):
        given, grouped = results[preconditioned, False], results[preconditioned, True]
        worst = max(float((grouped[n] - given[n]).abs().max() / given[n].abs().max()) for n in given)
        what = "preconditioned" if preconditioned else "raw"
        print(f"{what}: largest difference {worst:.1e} of a layer's largest entry")


if __name__ == "__main__":
    main()
