"""The validation figure: per model, estimators vs the PBRF (vs the exact influence where the PBRF was not run),
correlation bars, accuracy vs time, damping ablation."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from .metrics import estimators_in_order  # noqa: E402

def figure(results: dict[str, dict], table: pd.DataFrame, ablation: pd.DataFrame) -> plt.Figure:
    """Row per model: scatter EK-FAC / LiSSA / identity vs PBRF (or exact); Pearson bars; Pearson vs time; damping
    ablation."""
    fig, axes = plt.subplots(len(results), 4, figsize=(17, 3.8 * len(results)), squeeze=False)
    colors = {"ekfac": "tab:red", "kfac": "tab:orange", "diagonal": "tab:green", "identity": "tab:gray",
              "lissa": "tab:blue", "exact_layerwise": "tab:brown", "exact": "black"}
    for row, (name, result) in zip(axes, results.items()):
        influence = result["influence"]
        truth_name = "pbrf" if "pbrf" in influence else "exact"
        truth_label = {"pbrf": "PBRF", "exact": "exact"}[truth_name]
        keep = result["keep"].get(truth_name, torch.ones(influence["exact"].shape[1], dtype=torch.bool))
        truth = influence[truth_name][:, keep]
        ax = row[0]
        for estimator in ("ekfac", "lissa", "identity"):
            est = influence[estimator][:, keep]
            # each query's scores divided by their std, so queries and estimators share one axis
            x = (truth / truth.std(dim=1, keepdim=True)).flatten().numpy()
            y = (est / est.std(dim=1, keepdim=True)).flatten().numpy()
            ax.scatter(x, y, s=5, alpha=0.5, color=colors[estimator], label=estimator)
        lim = np.abs(ax.get_xlim()).max()
        ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.7)
        ax.set_xlabel(f"{truth_label} influence (per-query std units)")
        ax.set_ylabel("estimate (per-query std units)")
        points = f"{int(keep.sum())} converged points" if truth_name == "pbrf" else f"{int(keep.sum())} points"
        ax.set_title(f"{name}: estimators vs {truth_label} ({points})", fontsize=9)
        ax.legend(fontsize=7)

        ax = row[1]
        sub = table[(table.model == name)]
        truths = [gt for gt in ("pbrf", "pbrf_one_copy", "exact") if gt in influence]
        names = [e for e in estimators_in_order(result) if set(truths) - {e}]  # a ground truth alone has no bar
        width = 0.8 / len(truths)
        for k, gt in enumerate(truths):
            vals = [sub[(sub.estimator == e) & (sub.ground_truth == gt)] for e in names]
            means = [float(v.pearson.iloc[0]) if len(v) else np.nan for v in vals]
            stds = [float(v.pearson_std.iloc[0]) if len(v) else 0 for v in vals]
            ax.bar(np.arange(len(names)) + (k - (len(truths) - 1) / 2) * width, means, width, yerr=stds, capsize=2,
                   label=f"vs {gt}", color={"pbrf": "tab:purple", "pbrf_one_copy": "plum", "exact": "tab:cyan"}[gt])
        ax.set_xticks(np.arange(len(names)), names, rotation=30, fontsize=8)
        ax.set_ylim(min(0, float(np.nanmin(sub.pearson)) - 0.05), 1.02)
        ax.set_ylabel("Pearson (mean over queries)")
        ax.set_title(f"{name}: correlation with ground truth", fontsize=9)
        ax.legend(fontsize=7)

        ax = row[2]
        pb = sub[sub.ground_truth == truth_name].set_index("estimator")
        curve = [(pb.loc[k, "ihvp_seconds"], pb.loc[k, "pearson"]) for _, k in result["lissa_curve"]]
        ax.plot(*zip(*curve), "o-", color=colors["lissa"], label="LiSSA (depth sweep)")
        for estimator in ("ekfac", "kfac", "diagonal"):
            ax.plot(pb.loc[estimator, "ihvp_seconds"], pb.loc[estimator, "pearson"], "s", color=colors[estimator],
                    label=estimator)
        if "exact" in pb.index:
            ax.plot(pb.loc["exact", "ihvp_seconds"], pb.loc["exact", "pearson"], "*", color="black", ms=9,
                    label=f"exact ({result['exact_method']})")
        ax.set_xscale("log")
        ax.set_xlabel("IHVP wall time, s (factor fitting included)")
        ax.set_ylabel(f"Pearson with {truth_label}")
        ax.set_title(f"{name}: accuracy vs time", fontsize=9)
        ax.legend(fontsize=7)

        ax = row[3]
        ab = ablation[(ablation.model == name) & (ablation.ground_truth == "exact")]
        for estimator, group in ab.groupby("estimator"):
            ax.plot(group.damping_factor, group.pearson, "o-", color=colors.get(estimator), label=estimator)
        ax.set_xscale("log")
        ax.set_xlabel("damping factor (x mean EK-FAC eigenvalue)")
        ax.set_ylabel("Pearson with exact (same damping)")
        ax.set_title(f"{name}: damping ablation", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig



def lds_figure(lds: pd.DataFrame) -> plt.Figure:
    """LDS per method with its bootstrap CI, the retraining noise ceiling as a band."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    order = lds.sort_values("lds", ascending=False)
    x = np.arange(len(order))
    ax.bar(x, order.lds, yerr=[order.lds - order.ci_low, order.ci_high - order.lds], capsize=3, color="tab:blue")
    ceiling = order.iloc[0]
    ax.axhspan(ceiling.noise_ceiling_low, ceiling.noise_ceiling_high, color="tab:gray", alpha=0.3,
               label=f"noise ceiling (seed vs seed) {ceiling.noise_ceiling:.2f}")
    ax.axhline(ceiling.noise_ceiling_mean, color="k", ls="--", lw=0.8,
               label=f"ceiling of the two-seed mean {ceiling.noise_ceiling_mean:.2f}")
    ax.set_xticks(x, order.method, rotation=30)
    ax.set_ylabel("LDS (Spearman, mean over queries)")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(f"LDS over {int(ceiling.subsets)} subsets x {int(ceiling.seeds)} seeds, {int(ceiling.queries)} queries",
                 fontsize=9)
    fig.tight_layout()
    return fig


def calibration_figure(pairs: pd.DataFrame, method: str) -> plt.Figure:
    """Measured change of log p(completion) against (k/N) x influence, per k; sampled pairs solid, others faint."""
    fig, ax = plt.subplots(figsize=(5, 4.2))
    colors = dict(zip(sorted(pairs.copies.unique()), ["tab:blue", "tab:green", "tab:orange", "tab:red", "tab:purple"]))
    for k, group in pairs.groupby("copies"):
        other, own = group[~group.sampled_pair], group[group.sampled_pair]
        ax.scatter(other[f"predicted_{method}"], other.measured, s=4, alpha=0.15, color=colors[k])
        ax.scatter(own[f"predicted_{method}"], own.measured, s=18, color=colors[k], label=f"k = {k}")
    lim = float(np.nanmax(np.abs(np.r_[pairs[f"predicted_{method}"], pairs.measured])))
    ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.7, label="measured = predicted")
    ax.set_xlabel(f"predicted: (k/N) x {method} influence (nats)")
    ax.set_ylabel("measured change of log p(completion) (nats)")
    ax.legend(fontsize=7)
    ax.set_title("add k copies, continue training", fontsize=9)
    fig.tight_layout()
    return fig
