"""What handing freed memory back to the OS costs and saves (issue 19, item 5; figures/bench/README.md).

    python -m benchmarks.memory_return --model gpt2_m --queries 128

Fits the bench workload's factors, then times `query_gradients` and `compute_scores` with the engine's
`return_freed_host_memory` (glibc malloc_trim) as it is ("trim") and replaced by a no-op ("none"), the variants
interleaved, each `--repeats` times: user and system CPU seconds (getrusage), peak RSS during the call (VmHWM reset
first) and RSS after it. Prints one line per call; nothing is written.
"""

from __future__ import annotations

import argparse
import resource

import torch

import influence_core.scores as scores_module
from benchmarks.peer_systems import peak_rss_mb, reset_peaks
from benchmarks.workloads import MODELS, Workload, load_workload
from influence_core import (CausalLMTask, FactorArguments, ScoreArguments, compute_scores, fit_factors, iterate_batches,
                            query_gradients, track_layers)

TRIM = scores_module.return_freed_host_memory


def cpu_seconds() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(name: str, label: str, call) -> object:
    """Run call() with the engine's trim on ("trim") or a no-op ("none"); print its costs; return its result."""
    scores_module.return_freed_host_memory = TRIM if label == "trim" else (lambda: False)
    try:
        reset_peaks()
        start, (user, system) = peak_rss_mb(), cpu_seconds()
        result = call()
        user_end, system_end = cpu_seconds()
        print(f"{name:16s} {label:5s} user {user_end - user:6.2f} s  system {system_end - system:5.2f} s  "
              f"start {start:6.0f} MiB  peak {peak_rss_mb():6.0f} MiB  after {rss_mb():6.0f} MiB", flush=True)
        return result
    finally:
        scores_module.return_freed_host_memory = TRIM


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="gpt2_m")
    parser.add_argument("--sequences", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    loaded = load_workload(Workload(args.model, args.sequences, 64, 16))
    model, task = loaded.model, CausalLMTask()
    layers = track_layers(model)
    batches = iterate_batches(loaded.train, 16)
    factors = fit_factors(model, layers, task, batches, FactorArguments(strategy="ekfac", progress=False))
    names, encoded = loaded.encoded_queries(args.queries)

    def query_gradients_call():
        return query_gradients(model, layers, task, iterate_batches(encoded, 32), progress=False, factors=factors)

    for _ in range(args.repeats):
        for label in ("trim", "none"):
            measure("query_gradients", label, query_gradients_call)
            TRIM()
    preconditioned = query_gradients_call()
    TRIM()
    for _ in range(args.repeats):
        for label in ("trim", "none"):
            measure("compute_scores", label, lambda: compute_scores(model, layers, task, batches, preconditioned, names,
                                                                    ScoreArguments(progress=False)))
            TRIM()


if __name__ == "__main__":
    main()
