"""Statistics of the validation: correlations of estimators with ground truths, tables, untrustworthy ground truths.

Correlations (Pearson, Spearman) are computed per test point (query) over the training points and averaged over
test points, as in the paper. With a dense G, LiSSA's convergence is measured per solve (query) and depth.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from scipy.stats import pearsonr, spearmanr

from .ground_truth import damped_system, relative_residual

def correlations(estimate: torch.Tensor, truth: torch.Tensor, keep: torch.Tensor | None = None) -> dict[str, float]:
    """Pearson / Spearman over training points (columns; those with keep=True) per query (row), mean and std over queries."""
    if keep is not None:
        estimate, truth = estimate[:, keep], truth[:, keep]
    pearson, spearman = [], []
    for e, t in zip(estimate.numpy(), truth.numpy()):
        if len(e) < 3 or np.std(e) == 0 or np.std(t) == 0:
            pearson.append(float("nan"))
            spearman.append(float("nan"))
            continue
        pearson.append(float(pearsonr(e, t)[0]))
        spearman.append(float(spearmanr(e, t)[0]))
    def mean_std(values: list[float]) -> tuple[float, float]:
        finite = [v for v in values if np.isfinite(v)]
        return (float(np.mean(finite)), float(np.std(finite))) if finite else (float("nan"), float("nan"))

    (p_mean, p_std), (s_mean, s_std) = mean_std(pearson), mean_std(spearman)
    return {"pearson": p_mean, "pearson_std": p_std, "spearman": s_mean, "spearman_std": s_std,
            "points": int(estimate.shape[1])}


def lissa_convergence(name: str, gnh: torch.Tensor, damping: torch.Tensor, q_flat: torch.Tensor, exact: torch.Tensor,
                      lissa, num_data: int, query_names) -> list[dict]:
    """Per LiSSA depth d and query: relative residual ||(G + lambda) x_d - q|| / ||q|| and relative error
    ||x_d - x*|| / ||x*|| against the dense solve x* (G the dense GNH, q_flat (Q, P), exact (Q, P)); `lissa` a
    reference.lissa.LissaResult with its snapshots (depth -> (Q, P)) and their wall times."""
    system = damped_system(gnh, damping)
    rows = []
    for depth in sorted(lissa.snapshots):
        estimate = lissa.snapshots[depth].to(gnh.dtype)
        residual = relative_residual(system, estimate, q_flat)
        error = (estimate - exact).norm(dim=1) / exact.norm(dim=1).clamp_min(1e-300)
        for query, r, e in zip(query_names, residual.tolist(), error.tolist()):
            rows.append({"model": name, "query": query, "depth": depth, "depth_over_n": depth / num_data,
                         "relative_residual": r, "relative_error": e,
                         "seconds": lissa.snapshot_seconds.get(depth, float("nan"))})
    return rows


GROUND_TRUTHS = ("exact", "pbrf", "pbrf_one_copy")


def correlation_table(name: str, result: dict) -> pd.DataFrame:
    """Long table: every estimator (and ground truth) against every ground truth; PBRF: converged points only."""
    rows = []
    influence, timings, keep = result["influence"], result["timings"], result["keep"]
    for estimator, values in influence.items():
        for truth in GROUND_TRUTHS:
            if estimator == truth or truth not in influence:
                continue
            mask = keep.get(truth)
            if estimator in keep:
                mask = keep[estimator] if mask is None else mask & keep[estimator]
            stats = correlations(values, influence[truth], mask)
            rows.append({"model": name, "estimator": estimator, "ground_truth": truth, **stats,
                         "excluded": result["num_scored"] - stats["points"],
                         "ihvp_seconds": timings.get(estimator, float("nan"))})
    return pd.DataFrame(rows)


ESTIMATOR_ORDER = ["ekfac", "kfac", "diagonal", "identity", "lissa", "exact_layerwise", "exact", "pbrf", "pbrf_one_copy"]


def estimators_in_order(result: dict) -> list[str]:
    return [e for e in ["ekfac", "kfac", "diagonal", "identity", "lissa", "exact_layerwise", "exact"]
            if e in result["influence"]]



def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, estimator): Pearson / Spearman with each ground truth, points left out, the IHVP time."""
    wide = table.pivot_table(index=["model", "estimator"], columns="ground_truth", values=["pearson", "spearman"])
    wide.columns = [f"{stat}_{gt}" for stat, gt in wide.columns]
    columns = [f"{stat}_{gt}" for gt in GROUND_TRUTHS for stat in ("pearson", "spearman") if f"{stat}_{gt}" in wide]
    wide = wide[columns]
    excluded = table[table.ground_truth == "pbrf"].groupby(["model", "estimator"]).excluded.first().rename("pbrf_excluded")
    seconds = table.groupby(["model", "estimator"]).ihvp_seconds.first()
    out = wide.join(excluded).join(seconds).reset_index()
    out["pbrf_excluded"] = out["pbrf_excluded"].astype("Int64")  # a count (missing for the ground truths themselves)
    order = {e: i for i, e in enumerate(ESTIMATOR_ORDER)}
    out["_o"] = out.estimator.map(lambda e: order.get(e, 20 + (int(e.split("depth")[-1]) if "depth" in e else 0)))
    return out.sort_values(["model", "_o"]).drop(columns="_o")



def ground_truth_warnings(results: dict, table: pd.DataFrame, cfg: DictConfig) -> list[str]:
    """One line per ground truth that is not trustworthy as run: a CG solve stopped above its tolerance, or a PBRF
    ground truth for which fewer than half of the training points converged."""
    warnings = []
    for name, r in results.items():
        info = r.get("exact_info") or {}
        residual = max(info.get("relative_residual") or [0.0])
        if residual > cfg.exact.cg_tolerance:
            warnings.append(f"{name}: the CG solve behind `exact` stopped after {info.get('iterations')} iterations at "
                            f"relative residual {residual:.1e} > {cfg.exact.cg_tolerance:g}: `exact` is approximate.")
    pbrf_rows = table[table.ground_truth.str.startswith("pbrf")].drop_duplicates(["model", "ground_truth"])
    for row in pbrf_rows.itertuples():
        total = int(row.points) + int(row.excluded)
        if 2 * int(row.points) < total:
            warnings.append(f"{row.model}: only {int(row.points)} of {total} training points converged for "
                            f"`{row.ground_truth}`: its correlations rest on those points alone (or are missing).")
    return warnings

