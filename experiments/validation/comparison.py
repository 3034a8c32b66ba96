"""One model through every estimator and ground truth (paper Sec 5.1, App C, Figs 6-7), and the loop over models.

Per model: query gradients; EK-FAC, K-FAC, diagonal, identity and LiSSA (estimators.py) with one damping per layer;
the exact damped-GNH influence and the PBRF (ground_truth.py; a setup may leave the PBRF out); the damping ablation
against the exact influence at each damping; dense models also get the diagnostics (diagnostics.py), the residual and
condition number of the dense solve, and LiSSA's residual at each depth (metrics.lissa_convergence). Timings: IHVP
wall time of all queries, factor fitting included.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from influence_core import ScoreArguments, compute_scores, iterate_batches, query_gradients, track_layers
from influence_core.reference.baselines import exact_ihvp, flatten_layers, unflatten_layers
from influence_core.reference.gnh import layer_damping_vector, num_tracked_parameters
from influence_core.reference.lissa import LissaArguments, lissa_ihvp

from . import setups
from .diagnostics import dense_diagnostics, eigenbasis_check
from .estimators import (FACTOR_STRATEGIES, factor_operator, fit_strategies, layer_damping, precondition, run_lissa,
                         timed)
from .ground_truth import damped_system, dense_solve_info, exact_solution, layerwise, pbrf_ground_truths
from .metrics import correlation_table, correlations, lissa_convergence

REPO = Path(__file__).resolve().parents[2]


def run_validation(setup: setups.ValidationSetup, cfg: DictConfig) -> dict:
    """All estimators and ground truths on one model. Returns influence matrices (Q, M), timings and damping."""
    model, task = setup.model, setup.task
    layers = track_layers(model, setup.patterns)
    num_data = len(next(iter(setup.data.values())))
    num_scored = len(next(iter(setup.scored.values())))
    data_batches = iterate_batches(setup.data, setup.batch_size)
    size = num_tracked_parameters(layers)
    print(f"{setup.name}: {len(layers)} tracked layers, {size} parameters, {num_data} data points, "
          f"{len(setup.query_names)} queries, {num_scored} scored training points")
    q_layers = query_gradients(model, layers, task, iterate_batches(setup.queries, 16), progress=False)
    q_flat = flatten_layers(layers, q_layers).double()  # (Q, P)

    def scores_of(preconditioned: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(preconditioned, torch.Tensor):
            preconditioned = unflatten_layers(layers, preconditioned)
        return compute_scores(model, layers, task, iterate_batches(setup.scored, setup.batch_size), preconditioned,
                              setup.query_names, ScoreArguments(progress=False)).total.double()

    influence: dict[str, torch.Tensor] = {}
    factors, timings = fit_strategies(model, layers, task, data_batches, setup.fisher, cfg.seed)
    # one absolute damping per layer, from the EK-FAC eigenvalues, used by every estimator and ground truth
    damping_by_layer = layer_damping(factors["ekfac"], layers, cfg.damping_factor)
    damping = layer_damping_vector(layers, damping_by_layer)
    for strategy in FACTOR_STRATEGIES:
        preconditioned, seconds = timed(lambda: precondition(factors[strategy], q_layers, damping_by_layer))
        timings[strategy] += seconds
        influence[strategy] = scores_of(preconditioned)

    # LiSSA: depth = number of data points (paper); snapshots along the way for the accuracy-vs-time curve
    lissa, lissa_args = run_lissa(model, layers, task, setup.data, q_flat, damping,
                                  setup.lissa_depth_multiple or cfg.lissa.depth_multiple, cfg.lissa, cfg.seed,
                                  bool(cfg.progress))
    lissa_curve = []
    for step in lissa_args.snapshots:
        key = "lissa" if step == num_data else f"lissa_depth{step}"
        influence[key] = scores_of(lissa.snapshots[step])
        timings[key] = lissa.snapshot_seconds[step]
        lissa_curve.append((step, key))

    # Ground truth 1: the exact damped-GNH influence
    exact_method = "dense" if size <= cfg.exact.dense_limit else "cg"
    if setup.gauss_newton != "per_class" and exact_method != "dense":
        raise ValueError(f"{setup.name}: gauss_newton '{setup.gauss_newton}' forms a dense G, but {size} tracked "
                         f"parameters exceed exact.dense_limit={cfg.exact.dense_limit}; track fewer layers or raise it")
    ekfac_inverse = factor_operator(factors["ekfac"], layers, damping_by_layer)
    exact, timings["exact"] = timed(lambda: exact_solution(model, layers, task, data_batches, q_flat, damping, cfg,
                                                           exact_method, preconditioner=ekfac_inverse,
                                                           gauss_newton=setup.gauss_newton))
    influence["exact"] = scores_of(exact["ihvp"])
    convergence_of_lissa = []
    if exact_method == "dense":
        influence["exact_layerwise"], timings["exact_layerwise"] = timed(
            lambda: scores_of(exact_ihvp(layerwise(exact["gnh"], layers), q_flat, damping)))
        timings["exact_layerwise"] += exact["gnh_seconds"]
        # with the PBRF, G + lambda's eigendecomposition is needed for its preconditioner too: computed once
        start = time.perf_counter()
        decomposition = torch.linalg.eigh(damped_system(exact["gnh"], damping)) if setup.pbrf else None
        decomposition_seconds = time.perf_counter() - start
        exact["dense_info"] = dense_solve_info(exact["gnh"], damping, q_flat, exact["ihvp"],
                                               None if decomposition is None else decomposition[0])
        convergence_of_lissa = lissa_convergence(setup.name, exact["gnh"], damping, q_flat, exact["ihvp"], lissa,
                                                 num_data, setup.query_names)

    # Ground truth 2: the PBRF, optimised from the trained weights; preconditioning only speeds the solve up
    keep, convergence = {}, []
    if setup.pbrf:
        if exact_method == "dense":
            start = time.perf_counter()
            values, vectors = decomposition
            root = (vectors / values.sqrt()) @ vectors.T  # (G + lambda)^{-1/2}, symmetric
            preconditioner = (lambda v: v @ root)
            preconditioner_seconds = decomposition_seconds + time.perf_counter() - start
        else:
            preconditioner = factor_operator(factors["ekfac"], layers, damping_by_layer, power=0.5)
            preconditioner_seconds = 0.0
        epsilons = {"pbrf": cfg.pbrf.epsilon}
        if cfg.pbrf.one_copy and exact_method == "dense":
            epsilons["pbrf_one_copy"] = 1.0 / num_data
        pbrf, pbrf_seconds, keep, convergence = pbrf_ground_truths(setup, layers, damping, exact, influence["exact"],
                                                                   epsilons, preconditioner, preconditioner_seconds, cfg)
        influence.update(pbrf)
        timings.update(pbrf_seconds)
    else:
        print(f"{setup.name}: PBRF not run (pbrf: false)")

    # Damping ablation: the same factors, the exact ground truth at each damping
    ablation = []
    for factor in cfg.damping_ablation:
        by_layer = {n: factor / cfg.damping_factor * v for n, v in damping_by_layer.items()}
        vector = layer_damping_vector(layers, by_layer)
        if factor == cfg.damping_factor:
            truths = {"exact": influence["exact"]}
            residual = max(exact["info"]["relative_residual"]) if "info" in exact else 0.0
        else:
            solution = exact_solution(model, layers, task, data_batches, q_flat, vector, cfg, exact_method,
                                      gnh=exact.get("gnh"), preconditioner=factor_operator(factors["ekfac"], layers, by_layer),
                                      tolerance=cfg.exact.ablation_cg_tolerance,
                                      max_iterations=cfg.exact.ablation_cg_max_iterations)
            truths = {"exact": scores_of(solution["ihvp"])}
            residual = max(solution["info"]["relative_residual"]) if "info" in solution else 0.0
        estimates = {strategy: scores_of(precondition(factors[strategy], q_layers, by_layer))
                     for strategy in FACTOR_STRATEGIES}
        if exact_method == "dense":
            estimates["exact_layerwise"] = truths["exact_layerwise"] = scores_of(
                exact_ihvp(layerwise(exact["gnh"], layers), q_flat, vector))
        if cfg.lissa.in_ablation:
            estimates["lissa"] = scores_of(lissa_ihvp(model, layers, task, setup.data, q_flat, vector,
                                                      LissaArguments(**{**lissa_args.__dict__, "snapshots": ()})).ihvp)
        for truth_name, truth in truths.items():
            for estimator, estimate in estimates.items():
                if estimator != truth_name:
                    ablation.append({"model": setup.name, "damping_factor": factor, "estimator": estimator,
                                     "ground_truth": truth_name, **correlations(estimate, truth),
                                     "exact_cg_residual": residual})

    diagnostics, eigenbasis = [], []
    if exact_method == "dense" and cfg.diagnostics.enabled:
        diagnostics = dense_diagnostics(setup, layers, exact["gnh"], q_flat, factors["ekfac"], damping_by_layer, cfg)
        eigenbasis = eigenbasis_check(setup.name, layers, exact["gnh"], factors["ekfac"], setup.fisher)
    return {"influence": influence, "timings": timings, "layer_damping": damping_by_layer, "lissa_curve": lissa_curve,
            "lissa_scale": lissa.scale, "lissa_depth": lissa_args.depth, "exact_method": exact_method,
            "exact_info": exact.get("info"), "dense_info": exact.get("dense_info"), "gauss_newton": setup.gauss_newton,
            "fisher": setup.fisher, "lissa_convergence": convergence_of_lissa, "convergence": convergence, "keep": keep, "ablation": ablation,
            "diagnostics": diagnostics, "eigenbasis": eigenbasis, "num_parameters": size, "num_data": num_data,
            "num_scored": num_scored, "num_queries": len(setup.query_names), "layers": [l.name for l in layers],
            "query_names": list(setup.query_names), "architecture": type(model).__name__,
            "model_parameters": sum(p.numel() for p in model.parameters())}


def run(cfg: DictConfig, run_dir: Path, command: str = "python -m experiments.validate") -> pd.DataFrame:
    """The whole validation: every model, tables and figure into run_dir (and cfg.figures_dir unless null)."""
    from .report import markdown_table, write_outputs

    results, table, ablation = run_models(cfg)
    figures_dir = REPO / cfg.figures_dir if cfg.figures_dir else None
    summary = write_outputs(results, table, ablation, Path(run_dir), figures_dir, cfg, command)
    print(markdown_table(summary))
    print(f"tables and figure in {run_dir}" + (f" and {figures_dir}" if figures_dir else ""))
    return summary


def model_setup(name: str, cfg: DictConfig) -> setups.ValidationSetup | None:
    """The configured setup of one model name (None when its files are missing)."""
    if name in cfg.digits_models:
        return setups.digits_mlp_setup(OmegaConf.merge(cfg.digits, cfg.digits_models[name] or {}), name)
    if name in cfg.language_models:
        return setups.language_model_setup(name, cfg.language_models[name], Path(cfg.artifacts))
    raise ValueError(f"unknown model '{name}'; choose one of {list(cfg.digits_models) + list(cfg.language_models)}")


def run_models(cfg: DictConfig) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Every configured model: ({model: run_validation result}, long correlation table, damping ablation table)."""
    results = {}
    for name in cfg.models:
        setup = model_setup(name, cfg)
        if setup is None:
            continue
        start = time.perf_counter()
        results[name] = run_validation(setup, cfg)
        results[name]["seconds"] = time.perf_counter() - start
        print(f"{name}: done in {results[name]['seconds']:.0f} s")
    if not results:
        raise RuntimeError("no model was validated; check `models` and that their files exist")
    table = pd.concat([correlation_table(n, r) for n, r in results.items()], ignore_index=True)
    ablation = pd.DataFrame([row for r in results.values() for row in r["ablation"]])
    return results, table, ablation
