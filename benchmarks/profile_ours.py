"""Where our time goes: torch.profiler over one EK-FAC fit and one scoring pass of a peer-benchmark workload.

    python -m benchmarks.profile_ours --model gpt2_m --sequences 256 --queries 128
    py-spy record -o prof.svg -- python -m benchmarks.profile_ours ...      # the Python side, as a flame graph

Prints, per phase, the CPU time of this (one-thread) process, its ratio to the floor (one plain forward + backward
over the same data, measured first) and the operators with the most self CPU time, and writes them to --out (JSON)
for before/after comparisons.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.peer_systems import run_floor, warm_up
from benchmarks.workloads import Workload, load_workload
from influence_core import (CausalLMTask, FactorArguments, ScoreArguments, compute_scores, fit_factors, iterate_batches,
                            precondition_queries, query_gradients, track_layers)


def top_operators(prof, count: int) -> list[dict]:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:count]
    return [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in events]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2_m")
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--queries", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_workload(Workload(args.model, args.sequences))
    warm_up(loaded)
    model, task, layers = loaded.model, CausalLMTask(), track_layers(loaded.model)
    batches = iterate_batches(loaded.train, loaded.workload.batch_size)
    names, encoded = loaded.encoded_queries(args.queries)
    report = {"workload": loaded.workload.name, "queries": args.queries, "threads": args.threads,
              "torch": torch.__version__}
    floor = run_floor(loaded, [], Path("."), 0)
    report.update(floor_s=floor["floor_s"], floor_cpu_s=floor["floor_cpu_s"])

    def measured(name, fn):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start, start_cpu = time.perf_counter(), time.process_time()
            result = fn()
            seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        report[name] = {"s": seconds, "cpu_s": cpu, "over_floor": cpu / floor["floor_cpu_s"],
                        "top": top_operators(prof, args.top)}
        print(f"\n{name}: CPU {cpu:.2f} s = {cpu / floor['floor_cpu_s']:.2f} x floor ({floor['floor_cpu_s']:.2f} s); "
              f"wall {seconds:.2f} s")
        for row in report[name]["top"]:
            print(f"  {row['self_cpu_s']:8.3f} s  {row['calls']:6d}  {row['op']}")
        return result

    factors = measured("fit", lambda: fit_factors(model, layers, task, batches, FactorArguments(progress=False)))
    measured("score", lambda: compute_scores(
        model, layers, task, batches,
        precondition_queries(query_gradients(model, layers, task, iterate_batches(encoded, 32), progress=False),
                             factors), names, ScoreArguments(progress=False)))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
