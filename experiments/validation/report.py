"""Writing a validation run through the studies' result path: tables (csv + md) and figures (png + pdf) into the
run folder and figures/validate/..., then README.md (the command, the tables, what each column means) and
study.json (experiments/results.py), which the report and `make figures` read."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from experiments.results import CorpusRecord, ModelRecord, StudyRecord, write_study
from experiments.study import StudyOutput

from .figures import figure
from .metrics import ground_truth_warnings, summary_table


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """A markdown table with `digits` decimals, scientific notation for very small or large numbers."""
    cols = list(frame.columns)
    lines = ["| " + " | ".join(str(c) for c in cols) + " |", "|" + "---|" * len(cols)]

    def fmt(v) -> str:
        if v is pd.NA or v is None:
            return ""
        if isinstance(v, (float, np.floating)):
            if np.isnan(v):
                return ""
            return f"{v:.2e}" if v != 0 and (abs(v) < 10 ** -digits or abs(v) >= 1e5) else f"{v:.{digits}f}"
        return str(v)

    for _, r in frame.iterrows():
        lines.append("| " + " | ".join(fmt(v) for v in r.values) + " |")
    return "\n".join(lines)


class ValidationOutput(StudyOutput):
    """StudyOutput's tables and figures; README and study.json from explicit model records (the validation's
    models are not pipeline models: a digits MLP, the micro zoo, a fine-tuned GPT-2)."""

    def __init__(self, study: str, run_dir: Path, figures_dir: Path | None):
        super().__init__(study, run_dir, figures_dir)
        self.sections: list[str] = []

    def section(self, title: str, text: str = "", frame: pd.DataFrame | None = None, digits: int = 3) -> None:
        """A README section: a heading, a paragraph, a table."""
        self.sections += [f"## {title}", ""] + ([text, ""] if text else []) + (
            [markdown_table(frame, digits), ""] if frame is not None else [])

    def finish(self, title: str, intro: str, cfg: DictConfig, command: str, models: Sequence[ModelRecord],
               corpus: CorpusRecord, queries: Sequence[str], footer: Sequence[str] = ()) -> None:
        files = [f"- {f}" for f in [*self.tables.values(), *self.figures.values()]]
        text = [f"# {title}", "", f"Produced by: `{command}`", "", intro, "", *self.sections, *footer,
                "Files (study.json lists them with the models, settings and verdicts):", "", *files, ""]
        for d in self.dirs:
            (d / "README.md").write_text("\n".join(text))
        record = StudyRecord(study=self.study, models=list(models), corpus=corpus, queries=list(queries),
                             settings=OmegaConf.to_container(cfg, resolve=True), tables=dict(self.tables),
                             figures=dict(self.figures), verdicts=list(self.verdict_rows), paper=dict(self.paper),
                             command=command)
        for d in self.dirs:
            write_study(d, record)


CORRELATIONS_TEXT = (
    "Pearson / Spearman: per test point (query) over the scored training points, mean over test points "
    "(the figure's error bars: std over test points). Columns `*_pbrf`: only the training points whose "
    "PBRF solves converged (`pbrf_excluded` = points left out). `lissa` = depth N (number of data points, "
    "as in the paper); `lissa_depthK` = other depths of the same recursion. `exact` = dense GNH solve or "
    "EK-FAC-preconditioned CG on exact GNH-vector products (cross-layer blocks included); `exact_layerwise` "
    "= the dense GNH without its cross-layer blocks. ihvp_seconds: wall time of the IHVP for all queries, "
    "factor fitting included (exact: forming G; PBRF: all solves). Machine: 2 shared CPU cores, float64.")


def pbrf_text(cfg: DictConfig) -> str:
    return ("Each training point: two solves (+eps and -eps, central difference), L-BFGS from the trained weights. "
            f"A solve has converged when its final gradient g of the PBRF objective J satisfies max |g| <= "
            f"{cfg.pbrf.gradient_tolerance} x max |grad J(0)| (`relative_gradient`), or when the first-order "
            "influence error it leaves, max_q |q^T (G + lambda)^{-1} g|, is at most "
            f"{cfg.pbrf.influence_tolerance} of the query's largest |exact influence| (small eps only: that "
            "estimate uses the curvature at the trained weights; `pbrf_one_copy` must meet the gradient test). "
            "A training point counts only if both its solves converged (`points_excluded`: the others, left out of "
            "every PBRF correlation). `max_estimated_error`: the largest first-order error of a reported PBRF "
            "influence, |q^T (G + lambda)^{-1} (g+ + g-)| / 2, in the same units (all points / converged points only).")


CURVATURE_TEXT = (
    "G, the curvature every method targets, is the Gauss-Newton Hessian of the tracked parameters over the curvature "
    "data (`num_data` sequences / training points): G = (1/N) sum_n sum_t J_nt^T (diag p_nt - p_nt p_nt^T) J_nt, with "
    "J_nt the Jacobian of the logits at predicted position t and p_nt the model's predictive distribution there. For "
    "softmax cross-entropy this is the true Fisher taken in expectation over the model's own labels, E_y~p[g g^T], "
    "exactly: no label is sampled. `gauss_newton` (models table) says how a dense G is formed, both exact in float64: "
    "`per_class`, one backward pass per (position, class) (influence_core.reference.baselines.exact_gauss_newton); "
    "`position_local`, for layers of the last block only, whose output at t reaches the logits at t alone: "
    "G = (1/N) sum_n sum_t (B_t^T H_t B_t) (x) a_t a_t^T with B_t = d logits_t / d output_t from one double backward "
    "per output unit and a_t the layer input [1] (baselines.position_local_gauss_newton; a random tangent checks the "
    "locality on every batch). CG models use exact GNH-vector products of the same G. EK-FAC and K-FAC are fitted on "
    "the same data with the `fisher` of the models table (`sampled`: one label per token drawn from the model, the "
    "paper's estimator; `expected`: the exact expectation); LiSSA uses exact GNH-vector products on mini-batches.")


SOLVES_TEXT = (
    "`exact_solves`: the solve behind `exact`. Dense: `dense_max_relative_residual` = max over queries of "
    "||(G + lambda) x - q|| / ||q|| of the Cholesky/LU solve, `eigenvalue_min` / `eigenvalue_max` / `condition_number` of "
    "G + lambda (eigvalsh); float64 loses about condition x 1e-16 of x. CG: iterations and the largest relative residual. "
    "`lissa_slowest_rate` = eigenvalue_min / lissa_scale: in expectation LiSSA's error along the slowest eigenvector of "
    "G + lambda shrinks by a factor 1 - rate per step, so `lissa_depth_for_1e-3` = ln(1e-3) / ln(1 - rate) steps shrink it "
    "1000-fold (the paper's depth is N = num_data). `lissa_convergence`: per "
    "depth (dense models), the relative residual ||(G + lambda) x_d - q|| / ||q|| and relative error ||x_d - x*|| / ||x*|| "
    "of LiSSA's estimate against the dense solve x*, median and max over queries (per query: lissa_convergence_long).")


EIGENBASIS_TEXT = (
    "The exact layer blocks G_l in EK-FAC's Kronecker eigenbasis, R = Q^T G_l Q: `correction_error` = "
    "max |diag(R) - Lambda| / max Lambda (EK-FAC's eigenvalues against the dense G: a check of "
    "normalisation, sampling and precision; ~1e-16 with the expected Fisher), `offdiagonal` = "
    "||R - diag(R)||_F / ||R||_F (what EK-FAC drops within the layer):")


def result_tables(results: dict, table: pd.DataFrame, ablation: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Every table of a validation run, by name (empty diagnostics are left out)."""
    speed, damping_rows, models, solves = [], [], [], []
    for name, r in results.items():
        t = r["timings"]
        speed.append({"model": name, "ekfac_seconds": t["ekfac"], "lissa_seconds": t["lissa"],
                      "lissa_over_ekfac": t["lissa"] / t["ekfac"], "lissa_depth": r["num_data"],
                      "lissa_scale": r["lissa_scale"], "exact_seconds": t["exact"], "exact_method": r["exact_method"],
                      "pbrf_seconds": t.get("pbrf", float("nan")), "num_parameters": r["num_parameters"],
                      "num_data": r["num_data"], "model_seconds": r["seconds"]})
        damping_rows += [{"model": name, "layer": layer, "damping": value} for layer, value in r["layer_damping"].items()]
        models.append({"model": name, "architecture": r.get("architecture", ""), "tracked_layers": len(r["layers"]),
                       "tracked_parameters": r["num_parameters"], "num_data": r["num_data"],
                       "num_scored": r["num_scored"], "num_queries": r["num_queries"],
                       "gauss_newton": r.get("gauss_newton", "per_class") if r["exact_method"] == "dense" else "vector products",
                       "fisher": r.get("fisher", ""), "pbrf": "pbrf" in r["influence"], "seconds": r["seconds"]})
        info, dense = r.get("exact_info") or {}, r.get("dense_info") or {}
        row = {"model": name, "exact_method": r["exact_method"], "cg_iterations": info.get("iterations"),
               "cg_max_relative_residual": max(info["relative_residual"]) if info else None}
        if dense:
            rate = dense["eigenvalue_min"] / r["lissa_scale"]  # LiSSA's slowest direction shrinks by 1 - rate a step
            row.update({"dense_max_relative_residual": max(dense["relative_residual"]),
                        "eigenvalue_min": dense["eigenvalue_min"], "eigenvalue_max": dense["eigenvalue_max"],
                        "condition_number": dense["condition_number"], "lissa_scale": r["lissa_scale"],
                        "lissa_slowest_rate": rate,
                        "lissa_depth_for_1e-3": float(np.log(1e-3) / np.log1p(-rate)) if 0 < rate < 1 else None})
        solves.append(row)
    ablation_wide = ablation.pivot_table(index=["model", "ground_truth", "estimator"], columns="damping_factor",
                                         values="pearson").reset_index()
    ablation_wide.columns = [c if isinstance(c, str) else f"damping_{c:g}" for c in ablation_wide.columns]
    residuals = ablation.groupby(["model", "damping_factor"]).exact_cg_residual.max().reset_index()
    tables = {"correlations": summary_table(table), "correlations_long": table, "damping_ablation": ablation,
              "damping_ablation_wide": ablation_wide, "timings": pd.DataFrame(speed),
              "pbrf_convergence": pd.DataFrame([row for r in results.values() for row in r["convergence"]]),
              "damping": pd.DataFrame(damping_rows), "models": pd.DataFrame(models),
              "exact_solves": pd.DataFrame(solves), "ablation_cg_residuals": residuals[residuals.exact_cg_residual > 0]}
    for key in ("diagnostics", "eigenbasis"):
        rows = [row for r in results.values() for row in r[key]]
        if rows:
            tables[key] = pd.DataFrame(rows)
    lissa_rows = [row for r in results.values() for row in r.get("lissa_convergence", [])]
    if lissa_rows:
        long = pd.DataFrame(lissa_rows)
        tables["lissa_convergence_long"] = long
        tables["lissa_convergence"] = long.groupby(["model", "depth"]).agg(
            depth_over_n=("depth_over_n", "first"), median_relative_residual=("relative_residual", "median"),
            max_relative_residual=("relative_residual", "max"), median_relative_error=("relative_error", "median"),
            max_relative_error=("relative_error", "max"), seconds=("seconds", "first")).reset_index()
    return tables


def write_outputs(results: dict, table: pd.DataFrame, ablation: pd.DataFrame, run_dir: Path,
                  figures_dir: Path | None, cfg: DictConfig, command: str) -> pd.DataFrame:
    """Tables, the figure, README.md and study.json; returns the summary table (one row per model and estimator)."""
    out = ValidationOutput("validate", run_dir, figures_dir)
    tables = result_tables(results, table, ablation)
    for name, frame in tables.items():
        out.table(name, frame)
    out.figure("validation", figure(results, table, ablation), paper="Figs 6-7 (estimators vs PBRF), App C")
    warnings = ground_truth_warnings(results, table, cfg)
    for line in warnings:
        print(f"warning: {line}")
    if warnings:
        out.section("Warnings: ground truth not converged", "\n".join(f"- {w}" for w in warnings))
    out.section("Models and curvature", CURVATURE_TEXT, tables["models"])
    out.section("Damping", "Absolute, the same for every estimator and ground truth: lambda_l = "
                f"{cfg.damping_factor} x mean EK-FAC eigenvalue of layer l:", tables["damping"], 6)
    out.section("Correlations and timings", CORRELATIONS_TEXT, tables["correlations"])
    out.section("Convergence of the solves", SOLVES_TEXT, tables["exact_solves"])
    if "lissa_convergence" in tables:
        out.section("LiSSA's convergence against the dense solve", "", tables["lissa_convergence"])
    if len(tables["pbrf_convergence"]):
        out.section("PBRF solves", pbrf_text(cfg), tables["pbrf_convergence"])
    else:
        out.section("PBRF solves", "Not run for these models (`pbrf: false`): the ground truth is the exact "
                    "damped-GNH influence alone.")
    out.section("EK-FAC vs LiSSA speed", "", tables["timings"])
    out.section("Damping ablation (Pearson with the ground truth at the same damping)", "",
                tables["damping_ablation_wide"])
    if len(tables["ablation_cg_residuals"]):
        out.section("CG residuals of the ablation", "Relative residual of the CG solve behind `exact` at each "
                    "damping (CG models):", tables["ablation_cg_residuals"])
    if "diagnostics" in tables:
        diagnostics = tables["diagnostics"]
        out.section("Diagnostics: where EK-FAC loses accuracy (Pearson with exact)", "",
                    diagnostics.drop(columns=[c for c in ("fisher", "fit_examples") if c in diagnostics]))
        out.section("EK-FAC's eigenbasis against the dense G", EIGENBASIS_TEXT, tables["eigenbasis"])
    models = [ModelRecord(name, r.get("source", ""), r.get("architecture", ""), int(r.get("model_parameters", 0)),
                          cfg.seed) for name, r in results.items()]
    corpus = CorpusRecord(path="per model: see models.csv (setups.py)", fingerprint="", columns=[],
                          num_sequences=sum(int(r["num_data"]) for r in results.values()))
    queries = [f"{name}/{q}" for name, r in results.items() for q in r.get("query_names", [])]
    out.finish("Validation: estimators against exact damped-GNH influence and the PBRF",
               "Every estimator against each ground truth on each model (experiments/validation/).", cfg, command,
               models, corpus, queries,
               footer=["![validation](validation.png)", "",
                       "What the numbers mean, and the investigation behind them: `figures/validate/FINDINGS.md`.", ""])
    return tables["correlations"]
