"""The gradient index (influence_core/index.py) against full EK-FAC, as ratios to one plain forward+backward pass.

    python -m benchmarks.index --model gpt2_s --sequences 10000     # -> figures/bench/index_gpt2_s.{csv,md}

One process, one thread: the floor (benchmarks/peer_systems.run_floor), EK-FAC factors and the exact scores of
Q queries over all N sequences (the ground truth), then for each index setting: build (one pass over the N
sequences), a query from the index alone (Q = 1, the second call of the process; the first, cold, apart) (query gradient + preconditioning + projection + the (N, K) x (K, Q)
product), and the exact EK-FAC re-rank of each query's `--candidates` best rows by the index. Overlap is
|top-100 after the re-rank  and  top-100 of full EK-FAC| / 100, mean (and min) over the Q queries.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import torch

from benchmarks.peer_systems import run_floor, warm_up
from benchmarks.workloads import PEERS_ARTIFACTS, Workload, describe, load_workload
from influence_core import (CausalLMTask, FactorArguments, ScoreArguments, compute_scores, fit_factors, iterate_batches,
                            query_gradients, track_layers)
from influence_core.index import GradientIndex, IndexArguments, build_index, rerank

SETTINGS = {  # name: IndexArguments fields
    "eigen32": dict(projection="eigen", output_dim=32, input_dim=32),
    "eigen16": dict(projection="eigen", output_dim=16, input_dim=16),
    "eigen32_fp16": dict(projection="eigen", output_dim=32, input_dim=32, dtype="float16"),
    "eigen64": dict(projection="eigen", output_dim=64, input_dim=64),
    "random32": dict(projection="random", output_dim=32, input_dim=32),
}
RECALL_AT = (200, 1000, 2000)  # re-ranking C candidates keeps exactly the true top-100 found in the index's top C


def overlap(rows: torch.Tensor, exact: torch.Tensor, k: int = 100, among: int | None = None) -> torch.Tensor:
    """(Q,) |rows[:, :among or k] and top-k of exact| / k."""
    truth = torch.topk(exact, k, dim=1).indices
    return torch.tensor([len(set(r[:among or k].tolist()) & set(t.tolist())) / k for r, t in zip(rows, truth)])


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2_s")
    parser.add_argument("--sequences", type=int, default=10000)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=500, help="rows per query re-ranked by exact EK-FAC")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("figures/bench"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    wall_start = time.perf_counter()
    loaded = load_workload(Workload(args.model, args.sequences))
    model, task, train, batch_size = loaded.model, CausalLMTask(), loaded.train, loaded.workload.batch_size
    warm_up(loaded)
    floor = run_floor(loaded, [], Path("."), 0, 2000)["floor_cpu_s"]
    layers = track_layers(model)
    work = PEERS_ARTIFACTS / "index" / f"{args.model}-n{args.sequences}"
    shutil.rmtree(work, ignore_errors=True)

    def cpu(fn):
        start = time.process_time()
        out = fn()
        return out, time.process_time() - start

    batches = iterate_batches(train, batch_size)
    factors, fit_s = cpu(lambda: fit_factors(model, layers, task, batches, FactorArguments(progress=False),
                                             output_dir=work / "factors"))
    names, encoded = loaded.encoded_queries(args.queries)
    query_batches = iterate_batches(encoded, 32)
    preconditioned, query_s = cpu(lambda: query_gradients(model, layers, task, query_batches, False, factors))
    exact, exact_s = cpu(lambda: compute_scores(model, layers, task, batches, preconditioned, names,
                                                ScoreArguments(progress=False)).total)
    one_query = iterate_batches({k: v[:1] for k, v in encoded.items()}, 1)
    rows = []
    for name in args.settings:
        index_args = IndexArguments(**SETTINGS[name], batch_size=batch_size, progress=False)
        index, build_s = cpu(lambda: build_index(model, layers, task, train, factors, work / name, index_args))
        index = GradientIndex(work / name)  # as a new process would: from disk

        def answer(query_batches):
            pre = query_gradients(model, layers, task, query_batches, False, factors)
            return index.scores(index.project_queries(pre)), pre

        (_, _), cold_s = cpu(lambda: answer(one_query))  # the first query of a fresh process: page cache, lazy init
        (_, _), q1_s = cpu(lambda: answer(one_query))
        (scores, pre), q_s = cpu(lambda: answer(query_batches))
        (_, _), rerank1_s = cpu(lambda: rerank(model, layers, task, train, {k: v[:1] for k, v in pre.items()},
                                               scores[:1], args.candidates, batch_size))
        (reranked, _), rerank_s = cpu(lambda: rerank(model, layers, task, train, pre, scores, args.candidates,
                                                     batch_size))
        before = overlap(torch.topk(scores, 100, dim=1).indices, exact)
        after = overlap(reranked, exact)
        pearson = torch.stack([torch.corrcoef(torch.stack([s, e]))[0, 1] for s, e in zip(scores, exact)])
        recall = {f"top100_overlap_after_rerank_c{c}": float(overlap(torch.topk(scores, c, dim=1).indices, exact, 100,
                                                                       c).mean()) for c in RECALL_AT if c <= scores.shape[1]}
        union = len(torch.unique(torch.topk(scores, args.candidates, dim=1).indices))
        rows.append({
            "workload": f"{args.model}-n{args.sequences}", "setting": name, **SETTINGS[name],
            "build_over_floor": build_s / floor, "query_over_floor": q1_s / floor, "query_cold_over_floor": cold_s / floor,
            "top100_overlap_after_rerank": float(after.mean()), "bytes_per_sequence": index.bytes_per_sequence,
            "top100_overlap_after_rerank_min": float(after.min()), "top100_overlap_index_only": float(before.mean()),
            "pearson_index_only": float(pearson.mean()), "rerank_candidates": args.candidates,
            "rerank_one_query_over_floor": rerank1_s / floor, f"query_q{args.queries}_over_floor": q_s / floor,
            f"rerank_q{args.queries}_over_floor": rerank_s / floor, f"rerank_q{args.queries}_union_rows": union,
            **recall, "fit_plus_build_over_floor": (fit_s + build_s) / floor, "disk_mb": index.bytes_per_sequence *
            index.num_sequences / 2**20,
        })
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    meta = {"command": "python -m benchmarks.index " + " ".join(argv or []), "workload": describe(loaded),
            "threads": args.threads, "floor_cpu_s": floor, "fit_over_floor": fit_s / floor,
            "exact_queries_over_floor": query_s / floor, f"exact_score_q{args.queries}_over_floor": exact_s / floor,
            "load_before": load_before, "load_after": os.getloadavg(), "cpu_count": os.cpu_count(),
            "wall_min": (time.perf_counter() - wall_start) / 60}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"index_{args.model}"
    table.to_csv(f"{stem}.csv", index=False)
    Path(f"{stem}.json").write_text(json.dumps(meta, indent=1, default=str))
    print(json.dumps(meta, indent=1, default=str))
    return table


if __name__ == "__main__":
    main()
