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
                      "pbrf_seconds": t["pbrf"], "num_parameters": r["num_parameters"], "num_data": r["num_data"],
                      "model_seconds": r["seconds"]})
        damping_rows += [{"model": name, "layer": layer, "damping": value} for layer, value in r["layer_damping"].items()]
        models.append({"model": name, "architecture": r.get("architecture", ""), "tracked_layers": len(r["layers"]),
                       "tracked_parameters": r["num_parameters"], "num_data": r["num_data"],
                       "num_scored": r["num_scored"], "num_queries": r["num_queries"], "seconds": r["seconds"]})
        info = r.get("exact_info") or {}
        solves.append({"model": name, "exact_method": r["exact_method"], "cg_iterations": info.get("iterations"),
                       "cg_max_relative_residual": max(info["relative_residual"]) if info else None})
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
    out.section("Damping", "Absolute, the same for every estimator and ground truth: lambda_l = "
                f"{cfg.damping_factor} x mean EK-FAC eigenvalue of layer l:", tables["damping"], 6)
    out.section("Correlations and timings", CORRELATIONS_TEXT, tables["correlations"])
    out.section("PBRF solves", pbrf_text(cfg), tables["pbrf_convergence"])
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
