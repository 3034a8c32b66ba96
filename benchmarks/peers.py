"""Ours side by side with the peer EK-FAC engines: speed, memory and agreement on the same workloads, in one run.

    python -m benchmarks.peers                      # the default grid (CPU, under 30 min on 2 cores); figures/bench/
    python -m benchmarks.peers --grid full          # every cell: 3 models x N in {1k, 10k} x Q in {1, 32, 128}
    python -m benchmarks.peers --grid smoke         # a few minutes: the zoo model, N=128, Q in {1, 8}
    python -m benchmarks.peers --grid reduced       # the default grid less its N = 10,000 cell
    python -m benchmarks.peers --models zoo --sequences 1000 --queries 1 32 --systems ours kronfluence

Each (workload, system) runs in its own subprocess (`benchmarks/peer_systems.py`), one after another, so peak RSS
is per system and no two systems compete for the cores. Per workload (model, N) every system fits EK-FAC factors
on the N sequences, then scores Q queries for each Q. Ratios divide by the floor, one plain forward + backward over
the same N sequences that each system's process measures just before its fit, so machine load (this is a shared
machine) shifts numerator and denominator alike. Agreement compares each peer's scores with ours on the same
(query, train) pairs: Pearson and Spearman per query, and the overlap of the top 100 sequences, averaged over
queries (at the largest Q of the cell).

Peers: kronfluence (pip install -e ".[bench]" then pip install --no-deps kronfluence==1.0.1; figures/bench/README.md
says why --no-deps), dattri-llm 0.1.0 (EKFACAttributor) and bergson 2.5.1 (its EK-FAC stages, and its gradient index:
rows `bergson_index`), all installed by `make bench-setup`; what a peer cannot share with ours is in `NOTES`, printed
in the table's footnote. `ours_rank32`: ours with rank-32 queries, beside full rank; `ours_subset`: ours with A and S
from 10% of the fitting batches (FactorArguments.covariance_fraction); `ours_one_pass`: ours fitted in one model pass
(FactorArguments.token_cache_bytes). The workloads are described in
`benchmarks/workloads.py`; they need `make bench-zoo`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import pearsonr, spearmanr

from benchmarks.index import overlap
from benchmarks.setup import FIGURES, load_average
from benchmarks.workloads import MODELS, PEERS_ARTIFACTS, Workload, load_workload

TOP_K = 100

NOTES = {  # what a peer does not share with ours, one line each (benchmarks/peer_systems.py has the details)
    "ours_subset": (
        "ours with the covariances A and S from the first 10% of the fitting batches (covariance_fraction 0.1, chosen "
        "from figures/bench/covariance_subset.md before this row was run) and the eigenvalue correction from all; "
        "its Pearson and top-100 overlap are against ours' full fit"
    ),
    "ours_one_pass": (
        "ours fitted in one model pass: the covariance pass keeps every batch's per-token activations and "
        "pseudo-gradients in memory (FactorArguments.token_cache_bytes; their size is token_cache_peak_bytes in the "
        "json, inside its peak RSS) and the eigenvalue correction is computed from them, with the covariance pass's "
        "labels; its Pearson and top-100 overlap are against ours' two-pass fit, whose correction draws other labels"
    ),
    "ours": (
        "ours groups its query batches (32 queries) by the queries' real length (`iterate_batches(..., by_length="
        "True)`, results in the queries' order), so a batch pads only to its own longest query; the peers take the "
        "same batches of 32 in the given order"
    ),
    "bergson": (
        "bergson 2.5.1 (`pip install --no-deps bergson==2.5.1` plus its other dependencies; its torchvision/torchaudio "
        "requirement has no CPU build for torch 2.13), its EK-FAC stages called in-process (hessian_worker, "
        "build_worker on the queries, apply_worker, score_worker) with our layers, bias columns, damping 0.1 x mean "
        "eigenvalue, summed loss, float32 and batches; not shared: its pseudo-labels (torch.multinomial on the global "
        "generator: other draws, its sampler's cost in its fit), its activation covariance leaves out each "
        "sequence's last position (no next-token label), it reads the model from a save_pretrained folder in every "
        "stage (inside its times; one load is `bergson_model_load_cpu_s` in its result.json) and writes every stage to "
        "disk, its fit runs two full gc.collect() passes (~0.35 s each here, whatever N), and its data loader is bypassed (it would re-tokenize text and cap a batch at the model's context, "
        "256 tokens for the bench GPT-2: our token rows go in as an in-memory datasets.Dataset); `bergson_index`: "
        "its gradient index (build_worker with projection_dim 32: random 32 x 32 per layer, the bytes of our eigen32) "
        "and one query through its Attributor, not preconditioned, since bergson applies EK-FAC only to unprojected "
        "gradients (EkfacApplicator refuses projection_dim with ev_correction): its agreement with ours is that of "
        "a plain gradient dot product"
    ),
}


@dataclass
class Cell:
    """A workload, the query counts to score and the systems to run on it: (label, system, seed)."""

    workload: Workload
    queries: list[int]
    systems: list[tuple[str, str, int]] = field(default_factory=list)


MAIN_SYSTEMS = [("ours", "ours", 0), ("kronfluence", "kronfluence", 0), ("dattri", "dattri", 0),
                ("bergson", "bergson", 0)]
RANK32 = [("ours_rank32", "ours_rank32", 0)]  # Q queries at rank 32 beside full rank (issue 19, item 2)
BELOW_TWO_PASSES = [("ours_subset", "ours_subset", 0),  # A and S from 10% of the fitting batches (issue 19, item 1)
                    ("ours_one_pass", "ours_one_pass", 0)]  # one model pass, the correction from the kept tokens
FULL_Q = {"ours", "kronfluence", "dattri", "bergson"}  # systems scored at every Q of a cell; the others at the largest
DIAGNOSTICS = [("ours_seed1", "ours", 1), ("kronfluence_shared", "kronfluence_shared", 0)]
ALL_SYSTEMS = MAIN_SYSTEMS + RANK32 + BELOW_TWO_PASSES + DIAGNOSTICS  # what --systems may name


def grid_cells(grid: str, seq_len: int, batch_size: int) -> list[Cell]:
    """The named grids. `default` is what `make bench` runs; see figures/bench/README.md for why these cells."""
    def cell(model, n, queries, systems=MAIN_SYSTEMS):
        return Cell(Workload(model, n, seq_len, batch_size), list(queries), list(systems))

    if grid == "smoke":
        return [cell("zoo", 128, [1, 8], MAIN_SYSTEMS + DIAGNOSTICS)]
    if grid == "default":
        return [cell("zoo", 1000, [1, 32, 128], MAIN_SYSTEMS + RANK32 + BELOW_TWO_PASSES + DIAGNOSTICS),
                cell("gpt2_s", 1000, [1, 32, 128], MAIN_SYSTEMS + RANK32 + BELOW_TWO_PASSES),
                cell("gpt2_m", 1000, [1, 32, 128], MAIN_SYSTEMS + RANK32 + BELOW_TWO_PASSES),
                cell("gpt2_s", 10000, [32])]
    if grid == "reduced":  # the default grid without its N = 10,000 cell: fits in ~20 min on 2 shared cores
        return grid_cells("default", seq_len, batch_size)[:3]
    if grid == "full":
        return [cell(m, n, [1, 32, 128], MAIN_SYSTEMS + RANK32 + BELOW_TWO_PASSES + (DIAGNOSTICS if n == 1000 else []))
                for n in (1000, 10000) for m in MODELS]
    raise ValueError(f"unknown grid {grid!r}; choose smoke, reduced, default or full")


# ------------------------------------------------------------------------------------------------ running


def peer_available(system: str) -> str | None:
    """None if the system can run here, else why not."""
    if system.startswith("kronfluence") and importlib.util.find_spec("kronfluence") is None:
        return ("skipped: kronfluence is not installed; make bench-setup (pip install -e '.[bench]' && "
                "pip install --no-deps kronfluence==1.0.1)")
    if system == "dattri" and importlib.util.find_spec("dattri_llm") is None:
        return "skipped: dattri-llm is not installed; make bench-setup (pip install dattri-llm==0.1.0)"
    if system == "bergson" and importlib.util.find_spec("bergson") is None:
        return "skipped: bergson is not installed; make bench-setup (pip install --no-deps bergson==2.5.1)"
    return None


def run_system(cell: Cell, label: str, system: str, seed: int, run_dir: Path, threads: int) -> dict:
    out = run_dir / cell.workload.name / label
    out.mkdir(parents=True, exist_ok=True)
    w = cell.workload
    queries = cell.queries if label in FULL_Q else [max(cell.queries)]
    command = [sys.executable, "-m", "benchmarks.peer_systems", "--system", system, "--model", w.model,
               "--sequences", str(w.sequences), "--seq-len", str(w.seq_len), "--batch-size", str(w.batch_size),
               "--seed", str(seed), "--threads", str(threads), "--out", str(out), "--queries", *map(str, queries)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = (out / "log.txt").read_text().strip().splitlines()[-1:] or [""]
        print(f"  {label}: FAILED (exit {done.returncode}) {tail[0]}; log in {out / 'log.txt'}", flush=True)
        return {"label": label, "error": f"exit {done.returncode}: {tail[0]}", "wall_s": wall}
    result = json.loads((out / "result.json").read_text())
    result.update(label=label, wall_s=wall, out=str(out))
    print(f"  {label}: {_summary(result)} (process {wall:.0f} s)", flush=True)
    return result


def _summary(result: dict) -> str:
    scores = ", ".join(f"Q={s['queries']} {s['score_cpu_s']:.1f} s" for s in result["scores"])
    index = result.get("index")
    index = f"; index build {index['build_cpu_s']:.1f} s, query {index['query_cpu_s']:.3f} s" if index else ""
    return f"CPU time: floor {result['floor_cpu_s']:.1f} s; fit {result['fit_cpu_s']:.1f} s; score {scores}{index}"


# ------------------------------------------------------------------------------------------------ tables


def agreement(ours: np.ndarray, peer: np.ndarray, k: int = TOP_K) -> dict:
    """Mean over queries of Pearson, Spearman and top-k overlap (share of ours' top k in the peer's top k)."""
    k = min(k, ours.shape[1])
    pearson, spearman, overlap = [], [], []
    for a, b in zip(ours, peer):
        pearson.append(pearsonr(a, b)[0])
        spearman.append(spearmanr(a, b)[0])
        overlap.append(len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k)
    return {"pearson": float(np.mean(pearson)), "pearson_min": float(np.min(pearson)),
            "spearman": float(np.mean(spearman)), f"top{TOP_K}_overlap": float(np.mean(overlap))}


def table(results: dict[str, list[dict]], cells: list[Cell]) -> pd.DataFrame:
    rows = []
    for cell in cells:
        name = cell.workload.name
        by_label = {r["label"]: r for r in results[name]}
        ours_dir = Path(by_label["ours"]["out"]) if "out" in by_label.get("ours", {}) else None
        for label, system, _ in cell.systems:
            r = by_label[label]
            base = {"workload": name, "system": label}
            if "error" in r or "skipped" in r:
                rows.append({**base, "note": r.get("skipped") or r["error"]})
                continue
            desc = r["workload"]
            for entry in r["scores"]:
                q = entry["queries"]
                row = {**base, "model": desc["model_name"], "architecture": desc["architecture"],
                       "parameters": desc["parameters"], "sequences": desc["sequences"], "tokens": desc["tokens"],
                       "queries": q, "floor_cpu_s": r["floor_cpu_s"], "fit_cpu_s": r["fit_cpu_s"],
                       "score_cpu_s": entry["score_cpu_s"],
                       "fit_over_floor": r["fit_cpu_s"] / r["floor_cpu_s"],
                       "score_over_floor": entry["score_cpu_s"] / r["floor_cpu_s"],
                       "floor_s": r["floor_s"], "fit_s": r["fit_s"], "score_s": entry["score_s"],
                       "fit_over_floor_wall": r["fit_s"] / r["floor_s"],
                       "score_over_floor_wall": entry["score_s"] / r["floor_s"],
                       "floor_peak_rss_mb": r["floor_peak_rss_mb"], "fit_peak_rss_mb": r["fit_peak_rss_mb"],
                       "score_peak_rss_mb": entry["score_peak_rss_mb"],
                       **{f"{k}_s": v for k, v in r["fit_stages_s"].items()}}
                if "fit_peak_gpu_mb" in r:
                    row.update(floor_peak_gpu_mb=r["floor_peak_gpu_mb"], fit_peak_gpu_mb=r["fit_peak_gpu_mb"],
                               score_peak_gpu_mb=entry.get("score_peak_gpu_mb"))
                if label != "ours" and ours_dir is not None and (ours_dir / f"scores_q{q}.npy").exists():
                    row.update(agreement(np.load(ours_dir / f"scores_q{q}.npy"),
                                         np.load(Path(r["out"]) / f"scores_q{q}.npy")))
                rows.append(row)
            if "index" in r:
                rows.append(index_row(base, r, ours_dir, min(q["queries"] for q in r["scores"]) if r["scores"] else 1))
    return pd.DataFrame(rows)


def index_row(base: dict, r: dict, ours_dir: Path | None, ours_q: int) -> dict:
    """A peer's gradient index: build (one pass over the N sequences) and one query, over the floor; agreement of
    the index's scores of the first query with ours (the first row of ours at its smallest Q: the same query)."""
    index = r["index"]
    row = {**base, "system": f"{base['system']}_index", "queries": index["queries"], "floor_cpu_s": r["floor_cpu_s"],
           "build_cpu_s": index["build_cpu_s"], "query_cpu_s": index["query_cpu_s"],
           "build_over_floor": index["build_cpu_s"] / r["floor_cpu_s"],
           "query_over_floor": index["query_cpu_s"] / r["floor_cpu_s"],
           "query_cold_over_floor": index["query_cold_cpu_s"] / r["floor_cpu_s"],
           "build_peak_rss_mb": index["build_peak_rss_mb"], "bytes_per_sequence": index["bytes_per_sequence"],
           "projection_dim": index["projection_dim"]}
    if "rerank_cpu_s" in index:  # ours: the query's best rows by the index rescored by exact EK-FAC
        row.update(rerank_over_floor=index["rerank_cpu_s"] / r["floor_cpu_s"],
                   rerank_candidates=index["rerank_candidates"])
    if ours_dir is not None and (ours_dir / f"scores_q{ours_q}.npy").exists():
        exact = np.load(ours_dir / f"scores_q{ours_q}.npy")[:1]
        row.update(agreement(exact, np.load(Path(r["out"]) / "index_scores_q1.npy")))
        reranked = Path(r["out"]) / "rerank_rows_q1.npy"
        if reranked.exists():  # share of the exact top k among the re-ranked rows' first k (benchmarks/index.py's)
            rows = np.load(reranked)
            k = min(TOP_K, exact.shape[1], rows.shape[1])
            row[f"top{TOP_K}_overlap_after_rerank"] = float(overlap(torch.from_numpy(rows), torch.from_numpy(exact),
                                                                    k).mean())
    return row


SHOWN = ["workload", "system", "queries", "floor_cpu_s", "fit_cpu_s", "score_cpu_s", "fit_over_floor",
         "score_over_floor", "fit_over_floor_wall", "score_over_floor_wall", "floor_peak_rss_mb", "fit_peak_rss_mb",
         "score_peak_rss_mb", "build_over_floor", "query_over_floor", "rerank_over_floor", "pearson", "spearman",
         f"top{TOP_K}_overlap", f"top{TOP_K}_overlap_after_rerank"]


def write_outputs(frame: pd.DataFrame, grid: str, manifest: dict) -> Path:
    FIGURES.mkdir(parents=True, exist_ok=True)
    stem = FIGURES / f"peers_{grid}"
    frame.to_csv(f"{stem}.csv", index=False)
    (Path(f"{stem}.json")).write_text(json.dumps(manifest, indent=1, default=str))
    shown = frame[[c for c in SHOWN + ["note"] if c in frame.columns]]
    note = (
        f"\n\nGrid `{grid}`, {manifest['wall_min']:.1f} min in all; torch threads {manifest['threads']} per system; "
        f"1-min load average {manifest['load_before']} before, {manifest['load_after']} after "
        f"({manifest['cpu_count']}-core machine shared with other jobs: read the ratios, measured in the same run, "
        f"rather than the seconds). Times in seconds of CPU time of the system's one-thread process (`*_cpu_s`; the "
        f"wall-clock ratios `*_wall` also count time other jobs held the cores, and the csv has the wall seconds): "
        f"fit = covariance + eigendecomposition + eigenvalue correction; "
        f"score = query gradients + preconditioning + one pass over the N training sequences for Q queries; "
        f"floor = one plain forward + backward (all parameter gradients) over the same N sequences, measured in each "
        f"system's process just before its fit. Peak RSS in MiB "
        f"of the system's own process during the phase (model, data and libraries included: compare across rows). "
        f"Agreement with ours on the same (query, train) pairs, mean over queries (top-{TOP_K} overlap = share of "
        f"ours' top {TOP_K} in the peer's). `ours_seed1`: ours with other sampled labels (the sampling noise floor); "
        f"`kronfluence_shared`: kronfluence fed our sampled labels (same definitions, same draw).\n\n"
        + "".join(f"- {name}: {why}\n" for name, why in manifest["skipped"].items())
        + "".join(f"- {name}: {what}\n" for name, what in manifest["notes"].items() if name in manifest["systems"])
        + "\nWorkloads: " + "; ".join(f"{w['name']}: {w['model_name']} ({w['architecture']}, {w['parameters']:,} "
                                     f"parameters, vocabulary {w['vocab_size']:,}), {w['sequences']} x {w['seq_len']} tokens"
                                     for w in manifest["workloads"]) + ".\n"
    )
    Path(f"{stem}.md").write_text(shown.round(4).to_markdown(index=False) + note)
    plot(frame, f"{stem}.png", grid)
    return stem


def plot(frame: pd.DataFrame, path: str, grid: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = frame.dropna(subset=["fit_over_floor"]) if "fit_over_floor" in frame else frame.iloc[:0]
    systems = list(dict.fromkeys(data["system"]))
    workloads = list(dict.fromkeys(data["workload"]))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    width = 0.8 / max(1, len(systems))
    fits = data.drop_duplicates(["workload", "system"])
    for i, system in enumerate(systems):
        values = [fits[(fits.workload == w) & (fits.system == system)]["fit_over_floor"].mean() for w in workloads]
        axes[0].bar(np.arange(len(workloads)) + i * width, values, width, label=system)
    axes[0].set_xticks(np.arange(len(workloads)) + width * (len(systems) - 1) / 2, workloads, rotation=20)
    axes[0].set_ylabel("factor fitting time / floor")
    axes[0].set_title("EK-FAC factor fitting")
    keys = list(dict.fromkeys(zip(data.workload, data.queries)))
    for i, system in enumerate(systems):
        part = data[data.system == system].set_index(["workload", "queries"])
        values = [part["score_over_floor"].get(k, np.nan) for k in keys]
        axes[1].bar(np.arange(len(keys)) + i * width, values, width, label=system)
        rss = [part["score_peak_rss_mb"].get(k, np.nan) for k in keys]
        axes[2].bar(np.arange(len(keys)) + i * width, rss, width, label=system)
    labels = [f"{w}\nQ={q}" for w, q in keys]
    for ax, title, ylabel in ((axes[1], "scoring (query gradients + one training pass)", "scoring time / floor"),
                              (axes[2], "peak RSS while scoring", "MiB")):
        ax.set_xticks(np.arange(len(keys)) + width * (len(systems) - 1) / 2, labels, fontsize=7)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
    for ax in axes[:2]:
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"EK-FAC engines side by side (grid {grid}); floor = one plain forward+backward over the same data")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="default", choices=["smoke", "reduced", "default", "full"])
    parser.add_argument("--models", nargs="+", choices=MODELS, help="instead of the grid: these models ...")
    parser.add_argument("--sequences", type=int, nargs="+", default=[1000], help="... times these N ...")
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 32, 128], help="... with these Q ...")
    parser.add_argument("--systems", nargs="+", default=[s for s, _, _ in MAIN_SYSTEMS],
                        choices=[s for s, _, _ in ALL_SYSTEMS], help="... and these systems")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each system's process")
    parser.add_argument("--name", help="output name (figures/bench/peers_<name>.*); default: the grid or 'custom'")
    args = parser.parse_args(argv)
    if args.models:
        chosen = [s for s in ALL_SYSTEMS if s[0] in args.systems]
        cells = [Cell(Workload(m, n, args.seq_len, args.batch_size), args.queries, chosen)
                 for n in args.sequences for m in args.models]
        grid = args.name or "custom"
    else:
        cells = grid_cells(args.grid, args.seq_len, args.batch_size)
        grid = args.name or args.grid
    run_dir = PEERS_ARTIFACTS / "runs" / grid
    start, load_before = time.perf_counter(), load_average()
    results: dict[str, list[dict]] = {}
    skipped: dict[str, str] = {}
    for cell in cells:
        print(f"{cell.workload.name} (Q = {cell.queries}):", flush=True)
        results[cell.workload.name] = []
        # the workload's caches (bench data generated and tokenized, GPT-2 models trained) are built here, not in the
        # first system's process, whose peak RSS would otherwise count them (ours ran first: +0.34 GB after loading)
        load_workload(cell.workload)
        for label, system, seed in cell.systems:
            reason = peer_available(system)
            if reason is not None:
                print(f"  {label}: {reason}", flush=True)
                skipped[label] = reason
                results[cell.workload.name].append({"label": label, "skipped": reason})
                continue
            results[cell.workload.name].append(run_system(cell, label, system, seed, run_dir, args.threads))
    workloads = []
    for cell in cells:
        described = next((r["workload"] for r in results[cell.workload.name] if "workload" in r), None)
        if described:
            workloads.append({**described, "name": cell.workload.name})
    cells_used = [{**asdict(c.workload), "queries": c.queries, "systems": c.systems} for c in cells]
    manifest = {"grid": grid, "cells": cells_used,
                "threads": args.threads, "wall_min": (time.perf_counter() - start) / 60, "load_before": load_before,
                "load_after": load_average(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                "workloads": workloads, "skipped": skipped, "run_dir": str(run_dir),
                "systems": sorted({label for c in cells for label, _, _ in c.systems} - set(skipped)), "notes": NOTES}
    frame = table(results, cells)
    stem = write_outputs(frame, grid, manifest)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(frame[[c for c in SHOWN if c in frame.columns]].round(3).to_string(index=False))
    print(f"wrote {stem}.csv/.md/.png in {manifest['wall_min']:.1f} min", flush=True)
    return frame


if __name__ == "__main__":
    main()
