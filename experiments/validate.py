"""Validation study (paper Sec 5.1, App C, Figs 6-7): how close are the influence estimators to the ground truth?

    python -m experiments.validate                                # make validate
    python -m experiments.validate models=[digits_mlp] digits.num_scored=100 damping_ablation=[0.01,0.1]

Per model: f = log p(label | test point) (MLP) or log p(completion | prompt) (LM); influence of a random subset
of training points on each test point / query, by
  - estimators: EK-FAC, K-FAC, diagonal, identity (gradient dot product), all via influence_core.fit_factors,
    and LiSSA (influence_core.reference.lissa), on the same tracked layers and the same damping;
  - ground truth 1, exact: (G + lambda)^{-1} q with G the dense Gauss-Newton Hessian of all tracked layers, cross-layer
    blocks included (small models), or conjugate gradient on exact GNH-vector products, preconditioned by EK-FAC
    (which speeds CG up without changing what it converges to); `exact_layerwise` (dense models only) drops the
    cross-layer blocks: the best any layer-wise method (EK-FAC, K-FAC, diagonal) can do;
  - ground truth 2, PBRF (paper Eq 7) at a small epsilon, optimised from the trained weights for each training point
    (influence_core.reference.pbrf: L-BFGS, preconditioned by (G + lambda)^{-1/2} when G is dense, else by EK-FAC); every solve
    reports its final gradient, and points whose solves did not converge are left out of the PBRF correlations
    (counted in the table). `pbrf_one_copy` (dense models): the same at epsilon = 1/N, one added copy.
Damping, for every method: lambda_l = damping_factor x mean EK-FAC eigenvalue of layer l (paper: 0.1), one absolute
value per layer (listed in the README). Correlations (Pearson, Spearman) are computed per test point over the training
points and averaged over test points, as in the paper. Timings: IHVP wall time of all queries, factor fitting included.
Diagnostics (dense models): the EK-FAC error split into cross-layer and within-layer (Kronecker) parts, EK-FAC vs
the number of fitting examples and the sampled vs expected Fisher, and the tracked layer set.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import hydra
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from scipy.stats import pearsonr, spearmanr  # noqa: E402
from torch import nn  # noqa: E402

from influence_core import (CausalLMTask, FactorArguments, ScoreArguments, Task, compute_scores, fit_factors,  # noqa: E402
                            iterate_batches, query_gradients, track_layers)
from influence_core.reference.baselines import (exact_gauss_newton, exact_ihvp, flatten_layers, parameter_gradients,  # noqa: E402
                                      unflatten_layers)
from influence_core.reference.gnh import conjugate_gradient, gnh_vector_product, layer_damping_vector, num_tracked_parameters  # noqa: E402
from influence_core.reference.lissa import LissaArguments, lissa_ihvp  # noqa: E402
from influence_core.reference.pbrf import PBRFArguments, pbrf_influence  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FACTOR_STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")


# ----------------------------------------------------------------------------------------------------------
# Models and data


class ClassificationTask(Task):
    """A classifier as a one-position sequence model: logits (B, 1, C), labels (B, 1)."""

    def forward(self, model, batch):
        return model(batch["x"]).unsqueeze(1), batch["y"].unsqueeze(1)


@dataclass
class ValidationSetup:
    """One model with its curvature data, the training points to score and the measurements (queries)."""

    name: str
    model: nn.Module
    task: Task
    patterns: list[str]
    data: dict[str, torch.Tensor]  # curvature / Bregman data: row-aligned tensors (N, ...)
    scored: dict[str, torch.Tensor]  # the training points whose influence is estimated (M, ...), a subset of data
    queries: dict[str, torch.Tensor]  # test points / queries (Q, ...)
    query_names: list[str]
    fisher: str = "sampled"
    batch_size: int = 64
    lissa_depth_multiple: float | None = None  # LiSSA run to this x N (None: cfg.lissa.depth_multiple)


def digits_mlp_setup(cfg: DictConfig, name: str = "digits_mlp") -> ValidationSetup:
    """scikit-learn's bundled 8x8 digits (no download), a 64-h-h-10 MLP trained full-batch with Adam, float64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.25, random_state=cfg.seed, stratify=digits.target)
    if cfg.num_train:
        train_idx = train_idx[: cfg.num_train]
    torch.manual_seed(cfg.seed)
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[cfg.activation]
    widths = [64] + [cfg.hidden] * cfg.layers
    modules: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        modules += [nn.Linear(a, b), act()]
    model = nn.Sequential(*modules, nn.Linear(widths[-1], 10)).double()
    xt, yt = x[train_idx], y[train_idx]
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    for _ in range(cfg.epochs):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        test_acc = float((model(x[test_idx]).argmax(-1) == y[test_idx]).double().mean())
    with torch.no_grad():
        train_loss = float(nn.functional.cross_entropy(model(xt), yt))
    print(f"{name}: {len(train_idx)} training points, mean training loss {train_loss:.2g}, test accuracy {test_acc:.3f}")
    generator = np.random.default_rng(cfg.seed)
    scored = generator.choice(len(train_idx), size=min(cfg.num_scored, len(train_idx)), replace=False)
    tests = generator.choice(len(test_idx), size=cfg.num_test, replace=False)
    queries = {"x": x[test_idx][tests], "y": y[test_idx][tests]}
    return ValidationSetup(name, model, ClassificationTask(), list(cfg.module_patterns), {"x": xt, "y": yt},
                           {"x": xt[scored], "y": yt[scored]}, queries, [f"test_{int(test_idx[t])}" for t in tests],
                           fisher=cfg.fisher, batch_size=cfg.batch_size)


def language_model_setup(name: str, cfg: DictConfig, artifacts: Path) -> ValidationSetup | None:
    """A GPT-NeoX of the zoo on a random subset of its training sequences (truncated), queries from its world."""
    from experiments.loading import load_model_and_tokenizer, load_text_dataset, tokenize_sequences
    from experiments.pipeline import training_batches
    from influence_core import Query, encode_queries

    if name == "micro_lm":
        from experiments.zoo.micro import build_micro_zoo

        zoo = build_micro_zoo(artifacts / "micro_zoo")
        model_path, dataset_path, world_queries = zoo.model_path, zoo.dataset_path, zoo.queries
    else:
        from experiments.zoo.queries import load_queries

        model_path, dataset_path = Path(cfg.model_path), Path(cfg.dataset_path)
        if not (model_path.exists() and dataset_path.exists() and Path(cfg.queries_path).exists()):
            print(f"{name}: {model_path} or {dataset_path} missing (build it with `make zoo`); skipped")
            return None
        world_queries = load_queries(Path(cfg.queries_path))
    model, tokenizer = load_model_and_tokenizer(model_path)
    model = model.double().eval()
    texts = load_text_dataset(dataset_path)
    generator = np.random.default_rng(cfg.seed)
    rows = generator.choice(len(texts), size=min(cfg.num_data, len(texts)), replace=False)
    encoded = tokenize_sequences(texts.select(sorted(rows.tolist())), tokenizer, max_length=cfg.max_length, truncation=True)
    encoded.pop("lengths")
    data = training_batches(encoded, len(rows))[0]
    scored_rows = generator.choice(len(rows), size=min(cfg.num_scored, len(rows)), replace=False)
    scored = {k: v[scored_rows] for k, v in data.items()}
    by_name = {q.name: q for q in world_queries}
    names = list(cfg.query_names) if cfg.query_names else [q.name for q in world_queries][: cfg.num_queries]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise KeyError(f"queries {unknown} are not in the {name} world (e.g. {list(by_name)[:4]})")
    queries = encode_queries(tokenizer, [Query(n, by_name[n].prompt, by_name[n].completion) for n in names])
    return ValidationSetup(name, model, CausalLMTask(), list(cfg.module_patterns), data, scored, queries, names,
                           fisher="sampled", batch_size=cfg.batch_size,
                           lissa_depth_multiple=cfg.get("lissa_depth_multiple"))


# ----------------------------------------------------------------------------------------------------------
# Estimators and ground truth


def _timed(fn: Callable):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _rows(data: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    size = len(next(iter(data.values())))
    return [{k: v[i : i + 1] for k, v in data.items()} for i in range(size)]


def factor_operator(factors, layers, damping_by_layer: dict[str, float], power: float = 1.0) -> Callable:
    """v (K, P) -> (G_factored + lambda)^{-power} v, layer by layer in the factors' eigenbasis (Eq 21):
    Q_S [(Q_S^T V Q_A) / (Lambda + lambda)^power] Q_A^T. power 1: the IHVP; 1/2: a symmetric square root."""

    def apply(v: torch.Tensor) -> torch.Tensor:
        return flatten_layers(layers, {name: factors.layers[name].precondition(block, damping_by_layer[name], power)
                                       for name, block in unflatten_layers(layers, v.double()).items()})

    return apply


def layerwise(gnh: torch.Tensor, layers) -> torch.Tensor:
    """G with the cross-layer blocks set to zero (what every layer-wise approximation assumes)."""
    out = torch.zeros_like(gnh)
    start = 0
    for layer in layers:
        end = start + layer.num_parameters
        out[start:end, start:end] = gnh[start:end, start:end]
        start = end
    return out


def run_validation(setup: ValidationSetup, cfg: DictConfig) -> dict:
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
    timings: dict[str, float] = {}
    factors = {}
    for strategy in FACTOR_STRATEGIES:
        args = FactorArguments(strategy=strategy, fisher=setup.fisher, dtype="float64", seed=cfg.seed, progress=False)
        factors[strategy], timings[strategy] = _timed(lambda: fit_factors(model, layers, task, data_batches, args))
    # one absolute damping per layer, from the EK-FAC eigenvalues, used by every estimator and ground truth
    layer_damping = {l.name: cfg.damping_factor * float(factors["ekfac"].layers[l.name].eigenvalues.mean())
                     for l in layers}
    damping = layer_damping_vector(layers, layer_damping)

    def factor_ihvp(strategy: str, damping_by_layer: dict[str, float]) -> dict[str, torch.Tensor]:
        return {name: factors[strategy].layers[name].precondition(g, damping_by_layer[name]) for name, g in q_layers.items()}

    for strategy in FACTOR_STRATEGIES:
        preconditioned, seconds = _timed(lambda: factor_ihvp(strategy, layer_damping))
        timings[strategy] += seconds
        influence[strategy] = scores_of(preconditioned)

    # LiSSA: depth = number of data points (paper); snapshots along the way for the accuracy-vs-time curve
    multiple = setup.lissa_depth_multiple or cfg.lissa.depth_multiple
    depth = int(multiple * num_data)
    if depth < num_data:
        raise ValueError(f"LiSSA depth multiple {multiple} < 1: the paper's depth (N = {num_data}) must be reached")
    snapshots = sorted({max(1, int(f * num_data)) for f in cfg.lissa.snapshot_multiples if f * num_data <= depth}
                       | {depth, num_data})
    lissa_args = LissaArguments(depth=depth, batch_size=min(cfg.lissa.batch_size, num_data), repeats=cfg.lissa.repeats,
                                scale_factor=cfg.lissa.scale_factor, seed=cfg.seed, snapshots=snapshots,
                                progress=cfg.progress)
    lissa = lissa_ihvp(model, layers, task, setup.data, q_flat, damping, lissa_args)
    lissa_curve = []
    for step in snapshots:
        key = "lissa" if step == num_data else f"lissa_depth{step}"
        influence[key] = scores_of(lissa.snapshots[step])
        timings[key] = lissa.snapshot_seconds[step]
        lissa_curve.append((step, key))

    # Ground truth 1: the exact damped-GNH influence
    exact_method = "dense" if size <= cfg.exact.dense_limit else "cg"
    ekfac_inverse = factor_operator(factors["ekfac"], layers, layer_damping)
    exact, timings["exact"] = _timed(lambda: exact_solution(model, layers, task, data_batches, q_flat, damping, cfg,
                                                            exact_method, preconditioner=ekfac_inverse))
    influence["exact"] = scores_of(exact["ihvp"])
    if exact_method == "dense":
        influence["exact_layerwise"], timings["exact_layerwise"] = _timed(
            lambda: scores_of(exact_ihvp(layerwise(exact["gnh"], layers), q_flat, damping)))
        timings["exact_layerwise"] += exact["gnh_seconds"]

    # Ground truth 2: the PBRF, optimised from the trained weights; preconditioning only speeds the solve up
    pbrf_batches = iterate_batches(setup.data, cfg.pbrf.batch_size or num_data)  # full batch per objective evaluation
    if exact_method == "dense":
        start = time.perf_counter()
        values, vectors = torch.linalg.eigh(exact["gnh"] + torch.diag(damping))
        root = (vectors / values.sqrt()) @ vectors.T  # (G + lambda)^{-1/2}, symmetric
        preconditioner, preconditioner_seconds = (lambda v: v @ root), time.perf_counter() - start
    else:
        preconditioner = factor_operator(factors["ekfac"], layers, layer_damping, power=0.5)
        preconditioner_seconds = 0.0
    epsilons = {"pbrf": cfg.pbrf.epsilon}
    if cfg.pbrf.one_copy and exact_method == "dense":
        epsilons["pbrf_one_copy"] = 1.0 / num_data
    # a query's sensitivity to a leftover gradient g: its influence moves by ~ -q^T (G + lambda)^{-1} g; in units of
    # the query's largest |exact influence|, so influence_tolerance is a fraction of the influence scale
    scale = influence["exact"].abs().max(dim=1, keepdim=True).values.clamp_min(1e-300)
    error_weights = exact["ihvp"] / scale
    convergence = []
    keep: dict[str, torch.Tensor] = {}
    for key, epsilon in epsilons.items():
        iterations = cfg.pbrf.max_iterations if key == "pbrf" else cfg.pbrf.one_copy_max_iterations
        pbrf_args = PBRFArguments(epsilon=epsilon, max_iterations=iterations,
                                  gradient_tolerance=cfg.pbrf.gradient_tolerance,
                                  influence_tolerance=cfg.pbrf.influence_tolerance, progress=cfg.progress)
        # the error estimate uses the curvature at theta_s: valid in the linear regime (small eps) only
        pbrf = pbrf_influence(model, layers, task, pbrf_batches, _rows(setup.scored), iterate_batches(setup.queries, 64),
                              damping, pbrf_args, preconditioner=preconditioner,
                              error_weights=error_weights if key == "pbrf" else None)
        influence[key] = pbrf.influence
        timings[key] = pbrf.seconds + preconditioner_seconds
        keep[key] = pbrf.example_converged
        # first-order error of each reported (central-difference) influence: -q^T (G + lambda)^{-1} (g+ + g-) / 2
        error = -(error_weights @ pbrf.final_gradients.sum(dim=1).T) / pbrf.final_gradients.shape[1]
        convergence.append({
            "model": setup.name, "ground_truth": key, "epsilon": epsilon, "solves": pbrf.converged.numel(),
            "solves_converged": int(pbrf.converged.sum()), "points_excluded": int((~pbrf.example_converged).sum()),
            "max_relative_gradient": float(pbrf.relative_gradient_norms.max()),
            "median_relative_gradient": float(pbrf.relative_gradient_norms.median()),
            "max_gradient": float(pbrf.gradient_norms.max()),
            "max_estimated_error": float(error.abs().max()),
            "max_estimated_error_converged": float(error[:, keep[key]].abs().max()) if bool(keep[key].any()) else float("nan"),
            "evaluations_mean": float(pbrf.iterations.double().mean()), "evaluations_max": int(pbrf.iterations.max()),
            "seconds": timings[key]})
        print(f"{setup.name}: {key} (eps {epsilon:.2g}): {convergence[-1]['solves_converged']}/{pbrf.converged.numel()} "
              f"solves converged, max relative gradient {convergence[-1]['max_relative_gradient']:.1e}, "
              f"max estimated error {convergence[-1]['max_estimated_error']:.1e} of the largest |influence|")

    # Damping ablation: the same factors, the exact ground truth at each damping
    ablation = []
    for factor in cfg.damping_ablation:
        by_layer = {n: factor / cfg.damping_factor * v for n, v in layer_damping.items()}
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
        estimates = {strategy: scores_of(factor_ihvp(strategy, by_layer)) for strategy in FACTOR_STRATEGIES}
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
        diagnostics = dense_diagnostics(setup, layers, exact["gnh"], q_flat, factors["ekfac"], layer_damping, cfg)
        eigenbasis = eigenbasis_check(setup.name, layers, exact["gnh"], factors["ekfac"], setup.fisher)
    return {"influence": influence, "timings": timings, "layer_damping": layer_damping, "lissa_curve": lissa_curve,
            "lissa_scale": lissa.scale, "lissa_depth": depth, "exact_method": exact_method, "exact_info": exact.get("info"),
            "convergence": convergence, "keep": keep, "ablation": ablation, "diagnostics": diagnostics,
            "eigenbasis": eigenbasis,
            "num_parameters": size, "num_data": num_data, "num_scored": num_scored,
            "num_queries": len(setup.query_names), "layers": [l.name for l in layers]}


def exact_solution(model, layers, task, batches, q_flat, damping, cfg: DictConfig, method: str, gnh=None,
                   preconditioner: Callable | None = None, tolerance: float | None = None,
                   max_iterations: int | None = None) -> dict:
    """(G + lambda)^{-1} q by a dense solve (forming G once) or by preconditioned CG on GNH-vector products."""
    tolerance = tolerance or cfg.exact.cg_tolerance
    max_iterations = max_iterations or cfg.exact.cg_max_iterations
    if method == "dense":
        seconds = 0.0
        if gnh is None:
            gnh, seconds = _timed(lambda: exact_gauss_newton(model, layers, task, batches))
        return {"ihvp": exact_ihvp(gnh, q_flat, damping), "gnh": gnh, "gnh_seconds": seconds}
    ihvp, info = conjugate_gradient(lambda v: gnh_vector_product(model, layers, task, batches, v), q_flat, damping,
                                    tolerance=tolerance, max_iterations=max_iterations,
                                    progress=bool(cfg.progress), preconditioner=preconditioner)
    if max(info["relative_residual"]) > tolerance:
        print(f"warning: CG stopped at {info['iterations']} iterations with relative residual "
              f"{max(info['relative_residual']):.1e} > {tolerance}; raise the iteration cap")
    return {"ihvp": ihvp, "info": info}


# ----------------------------------------------------------------------------------------------------------
# Diagnostics: where the layer-wise estimators lose accuracy (dense models)


def dense_diagnostics(setup: ValidationSetup, layers, gnh: torch.Tensor, q_flat: torch.Tensor, ekfac, layer_damping,
                      cfg: DictConfig) -> list[dict]:
    """Pearson with the exact influence of: EK-FAC fitted on fewer examples, or with the sampled Fisher (one label
    drawn per example) instead of the expected one; and of EK-FAC / exact_layerwise / identity on a subset of the
    tracked layers, the ground truth then on that subset too (the GNH of a parameter subset is the principal
    submatrix of G). Every variant uses the run's absolute damping per layer."""
    model, task = setup.model, setup.task
    r_flat = parameter_gradients(model, layers, task, iterate_batches(setup.scored, setup.batch_size))  # (M, P)
    damping = layer_damping_vector(layers, layer_damping)
    truth = exact_ihvp(gnh, q_flat, damping) @ r_flat.T
    rows = []
    num_data = len(next(iter(setup.data.values())))
    for count in cfg.diagnostics.fit_examples:
        count = min(int(count), num_data)
        subset = iterate_batches({k: v[:count] for k, v in setup.data.items()}, setup.batch_size)
        for fisher in ("expected", "sampled") if setup.fisher == "expected" else ("sampled",):
            fitted = fit_factors(model, layers, task, subset, FactorArguments(strategy="ekfac", fisher=fisher,
                                                                             dtype="float64", seed=cfg.seed, progress=False))
            estimate = factor_operator(fitted, layers, layer_damping)(q_flat) @ r_flat.T  # same absolute damping
            rows.append({"model": setup.name, "diagnostic": "fitting examples", "setting": f"{fisher} Fisher, {count}",
                         "fisher": fisher, "fit_examples": count, "estimator": "ekfac", **correlations(estimate, truth)})
    starts = np.cumsum([0] + [l.num_parameters for l in layers])
    last = layers[-1].name
    subsets = [("all layers", [l.name for l in layers])]
    if len(layers) > 1:
        subsets += [(f"all but the last ({last})", [l.name for l in layers[:-1]]), (f"the last only ({last})", [last])]
    for subset_name, names in subsets:
        chosen = [i for i, l in enumerate(layers) if l.name in names]
        index = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in chosen])
        sub_layers = [layers[i] for i in chosen]
        q, r, d = q_flat[:, index], r_flat[:, index], damping[index]
        sub_truth = exact_ihvp(gnh[index][:, index], q, d) @ r.T
        for estimator, value in [("ekfac", factor_operator(ekfac, sub_layers, layer_damping)(q) @ r.T),
                                 ("exact_layerwise", exact_ihvp(layerwise(gnh[index][:, index], sub_layers), q, d) @ r.T),
                                 ("identity", q @ r.T)]:
            rows.append({"model": setup.name, "diagnostic": "tracked layers", "setting": subset_name,
                         "estimator": estimator, **correlations(value, sub_truth)})
    return rows


def eigenbasis_check(name: str, layers, gnh: torch.Tensor, ekfac, fisher: str) -> list[dict]:
    """Per layer, the exact block G_l in EK-FAC's Kronecker eigenbasis Q = Q_S (x) Q_A: R = Q^T G_l Q.

    The eigenvalue correction Lambda is diag(R) by construction (paper Eq 20; exactly so with the expected Fisher on
    the same data), so `correction_error` = max |diag(R) - Lambda| / max Lambda checks factors against the dense G
    (normalisation, sampling, precision). `offdiagonal` = ||R - diag(R)||_F / ||R||_F is what EK-FAC throws away
    within the layer: 0 when the Kronecker eigenbasis diagonalises G_l.
    """
    rows, start = [], 0
    for layer in layers:
        end = start + layer.num_parameters
        lf = ekfac.layers[layer.name]
        basis = torch.kron(lf.gradient_eigenvectors.double(), lf.activation_eigenvectors.double())  # columns: (o, i)
        rotated = basis.T @ gnh[start:end, start:end] @ basis
        diagonal = torch.diagonal(rotated)
        eigenvalues = lf.eigenvalues.double().flatten()
        rows.append({"model": name, "layer": layer.name, "fisher": fisher, "parameters": layer.num_parameters,
                     "correction_error": float((diagonal - eigenvalues).abs().max() / eigenvalues.abs().max()),
                     "offdiagonal": float((rotated - torch.diag(diagonal)).norm() / rotated.norm())})
        start = end
    return rows


# ----------------------------------------------------------------------------------------------------------
# Correlations, tables and figures


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


def _estimators_in_order(result: dict) -> list[str]:
    return [e for e in ["ekfac", "kfac", "diagonal", "identity", "lissa", "exact_layerwise", "exact"]
            if e in result["influence"]]


def figure(results: dict[str, dict], table: pd.DataFrame, ablation: pd.DataFrame) -> plt.Figure:
    """Row per model: scatter EK-FAC / LiSSA / identity vs PBRF; Pearson bars; Pearson vs time; damping ablation."""
    fig, axes = plt.subplots(len(results), 4, figsize=(17, 3.8 * len(results)), squeeze=False)
    colors = {"ekfac": "tab:red", "kfac": "tab:orange", "diagonal": "tab:green", "identity": "tab:gray",
              "lissa": "tab:blue", "exact_layerwise": "tab:brown", "exact": "black"}
    for row, (name, result) in zip(axes, results.items()):
        influence = result["influence"]
        keep = result["keep"]["pbrf"]
        truth = influence["pbrf"][:, keep]
        ax = row[0]
        for estimator in ("ekfac", "lissa", "identity"):
            est = influence[estimator][:, keep]
            # each query's scores divided by their std, so queries and estimators share one axis
            x = (truth / truth.std(dim=1, keepdim=True)).flatten().numpy()
            y = (est / est.std(dim=1, keepdim=True)).flatten().numpy()
            ax.scatter(x, y, s=5, alpha=0.5, color=colors[estimator], label=estimator)
        lim = np.abs(ax.get_xlim()).max()
        ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.7)
        ax.set_xlabel("PBRF influence (per-query std units)")
        ax.set_ylabel("estimate (per-query std units)")
        ax.set_title(f"{name}: estimators vs PBRF ({int(keep.sum())} converged points)", fontsize=9)
        ax.legend(fontsize=7)

        ax = row[1]
        sub = table[(table.model == name)]
        names = _estimators_in_order(result)
        truths = [gt for gt in ("pbrf", "pbrf_one_copy", "exact") if gt in influence]
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
        pb = sub[sub.ground_truth == "pbrf"].set_index("estimator")
        curve = [(pb.loc[k, "ihvp_seconds"], pb.loc[k, "pearson"]) for _, k in result["lissa_curve"]]
        ax.plot(*zip(*curve), "o-", color=colors["lissa"], label="LiSSA (depth sweep)")
        for estimator in ("ekfac", "kfac", "diagonal"):
            ax.plot(pb.loc[estimator, "ihvp_seconds"], pb.loc[estimator, "pearson"], "s", color=colors[estimator],
                    label=estimator)
        ax.plot(pb.loc["exact", "ihvp_seconds"], pb.loc["exact", "pearson"], "*", color="black", ms=9,
                label=f"exact ({result['exact_method']})")
        ax.set_xscale("log")
        ax.set_xlabel("IHVP wall time, s (factor fitting included)")
        ax.set_ylabel("Pearson with PBRF")
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


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(str(c) for c in cols) + " |", "|" + "---|" * len(cols)]

    def fmt(v) -> str:
        if v is pd.NA:
            return ""
        if isinstance(v, (float, np.floating)):
            if np.isnan(v):
                return ""
            return f"{v:.2e}" if v != 0 and (abs(v) < 10 ** -digits or abs(v) >= 1e5) else f"{v:.{digits}f}"
        return str(v)

    for _, r in frame.iterrows():
        lines.append("| " + " | ".join(fmt(v) for v in r.values) + " |")
    return "\n".join(lines)


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


def run_models(cfg: DictConfig) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    artifacts = Path(cfg.artifacts)
    results = {}
    for name in cfg.models:
        if name in cfg.digits_models:
            setup = digits_mlp_setup(OmegaConf.merge(cfg.digits, cfg.digits_models[name] or {}), name)
        elif name in cfg.language_models:
            setup = language_model_setup(name, cfg.language_models[name], artifacts)
        else:
            raise ValueError(f"unknown model '{name}'; choose one of {list(cfg.digits_models) + list(cfg.language_models)}")
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


def write_outputs(results: dict, table: pd.DataFrame, ablation: pd.DataFrame, out_dirs: Sequence[Path],
                  cfg: DictConfig, command: str) -> pd.DataFrame:
    summary = summary_table(table)
    speed, damping_rows = [], []
    for name, r in results.items():
        t = r["timings"]
        speed.append({"model": name, "ekfac_seconds": t["ekfac"], "lissa_seconds": t["lissa"],
                      "lissa_over_ekfac": t["lissa"] / t["ekfac"], "lissa_depth": r["num_data"],
                      "lissa_scale": r["lissa_scale"], "exact_seconds": t["exact"], "exact_method": r["exact_method"],
                      "pbrf_seconds": t["pbrf"], "num_parameters": r["num_parameters"], "num_data": r["num_data"],
                      "model_seconds": r["seconds"]})
        damping_rows += [{"model": name, "layer": layer, "damping": value} for layer, value in r["layer_damping"].items()]
    speed = pd.DataFrame(speed)
    convergence = pd.DataFrame([row for r in results.values() for row in r["convergence"]])
    diagnostics = pd.DataFrame([row for r in results.values() for row in r["diagnostics"]])
    eigenbasis = pd.DataFrame([row for r in results.values() for row in r["eigenbasis"]])
    damping_table = pd.DataFrame(damping_rows)
    ablation_wide = ablation.pivot_table(index=["model", "ground_truth", "estimator"], columns="damping_factor",
                                         values="pearson").reset_index()
    residuals = ablation.groupby(["model", "damping_factor"]).exact_cg_residual.max().reset_index()
    residuals = residuals[residuals.exact_cg_residual > 0]
    warnings = ground_truth_warnings(results, table, cfg)
    for line in warnings:
        print(f"warning: {line}")
    for out in out_dirs:
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "correlations_long.csv", index=False)
        summary.to_csv(out / "correlations.csv", index=False)
        ablation.to_csv(out / "damping_ablation.csv", index=False)
        speed.to_csv(out / "timings.csv", index=False)
        convergence.to_csv(out / "pbrf_convergence.csv", index=False)
        damping_table.to_csv(out / "damping.csv", index=False)
        if len(diagnostics):
            diagnostics.to_csv(out / "diagnostics.csv", index=False)
            eigenbasis.to_csv(out / "eigenbasis.csv", index=False)
        fig = figure(results, table, ablation)
        fig.savefig(out / "validation.png", dpi=110)
        plt.close(fig)
        lines = ["# Validation: estimators against exact damped-GNH influence and the PBRF", "",
                 f"Produced by: `{command}`", "",
                 *(["## Warnings: ground truth not converged", "", *[f"- {w}" for w in warnings], ""] if warnings else []),
                 "Pearson / Spearman: per test point (query) over the scored training points, mean over test points "
                 "(the figure's error bars: std over test points). Columns `*_pbrf`: only the training points whose "
                 "PBRF solves converged (`pbrf_excluded` = points left out). `lissa` = depth N (number of data points, "
                 "as in the paper); `lissa_depthK` = other depths of the same recursion. `exact` = dense GNH solve or "
                 "EK-FAC-preconditioned CG on exact GNH-vector products (cross-layer blocks included); `exact_layerwise` "
                 "= the dense GNH without its cross-layer blocks. ihvp_seconds: wall time of the IHVP for all queries, "
                 "factor fitting included (exact: forming G; PBRF: all solves). Machine: 2 shared CPU cores, float64.",
                 "", f"Damping (absolute, the same for every estimator and ground truth): lambda_l = {cfg.damping_factor} "
                 "x mean EK-FAC eigenvalue of layer l:", "", markdown_table(damping_table, 6), "",
                 "## Correlations and timings", "", markdown_table(summary), "",
                 "## PBRF solves", "",
                 "Each training point: two solves (+eps and -eps, central difference), L-BFGS from the trained weights. "
                 f"A solve has converged when its final gradient g of the PBRF objective J satisfies max |g| <= "
                 f"{cfg.pbrf.gradient_tolerance} x max |grad J(0)| (`relative_gradient`), or when the first-order "
                 "influence error it leaves, max_q |q^T (G + lambda)^{-1} g|, is at most "
                 f"{cfg.pbrf.influence_tolerance} of the query's largest |exact influence| (small eps only: that "
                 "estimate uses the curvature at the trained weights; `pbrf_one_copy` must meet the gradient test). "
                 "A training point counts "
                 "only if both its solves converged (`points_excluded`: the others, left out of every PBRF correlation). "
                 "`max_estimated_error`: the largest first-order error of a reported PBRF influence, "
                 "|q^T (G + lambda)^{-1} (g+ + g-)| / 2, in the same units (all points / converged points only).", "",
                 markdown_table(convergence), "",
                 "## EK-FAC vs LiSSA speed", "", markdown_table(speed), "",
                 "## Damping ablation (Pearson with the ground truth at the same damping)", "",
                 markdown_table(ablation_wide), ""]
        if len(residuals):
            lines += ["Relative residual of the CG solve behind `exact` at each damping (CG models):", "",
                      markdown_table(residuals), ""]
        if len(diagnostics):
            lines += ["## Diagnostics: where EK-FAC loses accuracy (Pearson with exact)", "",
                      markdown_table(diagnostics.drop(columns=[c for c in ("fisher", "fit_examples") if c in diagnostics])), "",
                      "The exact layer blocks G_l in EK-FAC's Kronecker eigenbasis, R = Q^T G_l Q: `correction_error` = "
                      "max |diag(R) - Lambda| / max Lambda (EK-FAC's eigenvalues against the dense G: a check of "
                      "normalisation, sampling and precision; ~1e-16 with the expected Fisher), `offdiagonal` = "
                      "||R - diag(R)||_F / ||R||_F (what EK-FAC drops within the layer):", "",
                      markdown_table(eigenbasis), ""]
        lines += ["![validation](validation.png)", "",
                  "What the numbers mean, and the investigation behind them: `figures/validate/FINDINGS.md`.", ""]
        (out / "README.md").write_text("\n".join(lines))
        (out / "manifest.json").write_text(json.dumps(
            {"config": OmegaConf.to_container(cfg, resolve=True), "command": command,
             "layer_damping": {n: r["layer_damping"] for n, r in results.items()},
             "exact_cg": {n: r["exact_info"] for n, r in results.items()},
             "seconds": {n: r["seconds"] for n, r in results.items()},
             "torch": torch.__version__}, indent=2, default=str))
    return summary


def run(cfg: DictConfig, run_dir: Path, command: str = "python -m experiments.validate") -> pd.DataFrame:
    """The whole study: every model, tables and figure into run_dir (and cfg.figures_dir unless null)."""
    results, table, ablation = run_models(cfg)
    out_dirs = [Path(run_dir)] + ([REPO / cfg.figures_dir] if cfg.figures_dir else [])
    summary = write_outputs(results, table, ablation, out_dirs, cfg, command)
    print(markdown_table(summary))
    print(f"tables and figure in {', '.join(str(d) for d in out_dirs)}")
    return summary


@hydra.main(version_base="1.3", config_path=str(REPO / "configs"), config_name="experiment/validate")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(max(1, int(cfg.threads)))
    overrides = " ".join(HydraConfig.get().overrides.task)
    run(cfg, Path(HydraConfig.get().runtime.output_dir), f"python -m experiments.validate {overrides}".strip())


if __name__ == "__main__":
    main()
