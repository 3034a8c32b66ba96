"""Validation study (paper Sec 5.1, App C, Figs 6-7): how close are the influence estimators to the ground truth?

    python -m experiments.validate                                # make validate
    python -m experiments.validate models=[digits_mlp] digits.num_scored=100 damping_ablation=[0.01,0.1]

Per model: f = log p(label | test point) (MLP) or log p(completion | prompt) (LM); influence of a random subset
of training points on each test point / query, by
  - estimators: EK-FAC, K-FAC, diagonal, identity (gradient dot product), all via influence_core.fit_factors,
    and LiSSA (influence_core.lissa), on the same tracked layers and the same damping;
  - ground truth 1, exact: (G + lambda)^{-1} q with G the dense Gauss-Newton Hessian (small models) or conjugate
    gradient on exact GNH-vector products (influence_core.gnh);
  - ground truth 2, PBRF (paper Eq 7), solved by L-BFGS to convergence for each training point (influence_core.pbrf).
Damping, for every method: lambda_l = damping_factor x mean EK-FAC eigenvalue of layer l (paper: 0.1), one
value per layer. Correlations (Pearson, Spearman) are computed per test point over the training points and
averaged over test points, as in the paper. Timings: IHVP wall time of all queries, factor fitting included.
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
from influence_core.baselines import exact_gauss_newton, exact_ihvp, flatten_layers, unflatten_layers  # noqa: E402
from influence_core.gnh import conjugate_gradient, gnh_vector_product, layer_damping_vector, num_tracked_parameters  # noqa: E402
from influence_core.lissa import LissaArguments, lissa_ihvp  # noqa: E402
from influence_core.pbrf import PBRFArguments, pbrf_influence  # noqa: E402

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


def digits_mlp_setup(cfg: DictConfig) -> ValidationSetup:
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
    print(f"digits MLP: {len(train_idx)} training points, test accuracy {test_acc:.3f}")
    generator = np.random.default_rng(cfg.seed)
    scored = generator.choice(len(train_idx), size=min(cfg.num_scored, len(train_idx)), replace=False)
    tests = generator.choice(len(test_idx), size=cfg.num_test, replace=False)
    queries = {"x": x[test_idx][tests], "y": y[test_idx][tests]}
    return ValidationSetup("digits_mlp", model, ClassificationTask(), ["*"], {"x": xt, "y": yt},
                           {"x": xt[scored], "y": yt[scored]}, queries, [f"test_{int(test_idx[t])}" for t in tests],
                           fisher=cfg.fisher, batch_size=cfg.batch_size)


def language_model_setup(name: str, cfg: DictConfig, artifacts: Path) -> ValidationSetup | None:
    """A GPT-NeoX of the zoo on a random subset of its training sequences (truncated), queries from its world."""
    from experiments.common import training_batches
    from experiments.loading import load_model_and_tokenizer, load_text_dataset, tokenize_sequences
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
                           fisher="sampled", batch_size=cfg.batch_size)


# ----------------------------------------------------------------------------------------------------------
# Estimators and ground truth


def _timed(fn: Callable):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _rows(data: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    size = len(next(iter(data.values())))
    return [{k: v[i : i + 1] for k, v in data.items()} for i in range(size)]


def run_validation(setup: ValidationSetup, cfg: DictConfig) -> dict:
    """All estimators and ground truths on one model. Returns influence matrices (Q, M), timings and damping."""
    model, task = setup.model, setup.task
    layers = track_layers(model, setup.patterns)
    num_data = len(next(iter(setup.data.values())))
    data_batches = iterate_batches(setup.data, setup.batch_size)
    size = num_tracked_parameters(layers)
    print(f"{setup.name}: {len(layers)} tracked layers, {size} parameters, {num_data} data points, "
          f"{len(setup.query_names)} queries, {len(next(iter(setup.scored.values())))} scored training points")
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
    depth = int(cfg.lissa.depth_multiple * num_data)
    if depth < num_data:
        raise ValueError(f"lissa.depth_multiple={cfg.lissa.depth_multiple} < 1: the paper's depth (N = {num_data}) must be reached")
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

    exact_method = "dense" if size <= cfg.exact.dense_limit else "cg"
    exact, timings["exact"] = _timed(lambda: exact_solution(model, layers, task, data_batches, q_flat, damping, cfg, exact_method))
    influence["exact"] = scores_of(exact["ihvp"])

    pbrf_args = PBRFArguments(epsilon=cfg.pbrf.epsilon or 1.0 / num_data, max_iterations=cfg.pbrf.max_iterations,
                              gradient_tolerance=cfg.pbrf.gradient_tolerance, optimizer=cfg.pbrf.optimizer,
                              progress=cfg.progress)
    # full batch: one pass over the Bregman data per objective evaluation
    pbrf_batches = iterate_batches(setup.data, cfg.pbrf.batch_size or num_data)
    pbrf = pbrf_influence(model, layers, task, pbrf_batches, _rows(setup.scored), iterate_batches(setup.queries, 64),
                          damping, pbrf_args)
    influence["pbrf"] = pbrf.influence
    timings["pbrf"] = pbrf.seconds

    # Damping ablation: the same factors, the exact ground truth at each damping
    ablation = []
    for factor in cfg.damping_ablation:
        by_layer = {n: factor / cfg.damping_factor * v for n, v in layer_damping.items()}
        vector = layer_damping_vector(layers, by_layer)
        truth = scores_of(exact_solution(model, layers, task, data_batches, q_flat, vector, cfg, exact_method,
                                         gnh=exact.get("gnh"))["ihvp"])
        for strategy in FACTOR_STRATEGIES:
            estimate = scores_of(factor_ihvp(strategy, by_layer))
            ablation.append({"model": setup.name, "damping_factor": factor, "estimator": strategy,
                             **correlations(estimate, truth)})
        if cfg.lissa.in_ablation:
            estimate = lissa_ihvp(model, layers, task, setup.data, q_flat, vector,
                                  LissaArguments(**{**lissa_args.__dict__, "snapshots": ()})).ihvp
            ablation.append({"model": setup.name, "damping_factor": factor, "estimator": "lissa",
                             **correlations(scores_of(estimate), truth)})
    return {"influence": influence, "timings": timings, "layer_damping": layer_damping, "lissa_curve": lissa_curve,
            "lissa_scale": lissa.scale, "exact_method": exact_method, "exact_info": exact.get("info"),
            "pbrf_max_gradient": float(pbrf.gradient_norms.max()), "pbrf_epsilon": pbrf_args.epsilon,
            "pbrf_evaluations_mean": float(pbrf.iterations.double().mean()), "ablation": ablation,
            "num_parameters": size, "num_data": num_data}


def exact_solution(model, layers, task, batches, q_flat, damping, cfg: DictConfig, method: str, gnh=None) -> dict:
    """(G + lambda)^{-1} q by a dense solve (forming G once) or by conjugate gradient on GNH-vector products."""
    if method == "dense":
        gnh = gnh if gnh is not None else exact_gauss_newton(model, layers, task, batches)
        return {"ihvp": exact_ihvp(gnh, q_flat, damping), "gnh": gnh}
    ihvp, info = conjugate_gradient(lambda v: gnh_vector_product(model, layers, task, batches, v), q_flat, damping,
                                    tolerance=cfg.exact.cg_tolerance, max_iterations=cfg.exact.cg_max_iterations,
                                    progress=bool(cfg.progress))
    return {"ihvp": ihvp, "info": info}


# ----------------------------------------------------------------------------------------------------------
# Correlations, tables and figures


def correlations(estimate: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Pearson / Spearman over training points for each query (row), then mean and std over queries."""
    pearson, spearman = [], []
    for e, t in zip(estimate.numpy(), truth.numpy()):
        if np.std(e) == 0 or np.std(t) == 0:
            pearson.append(float("nan"))
            spearman.append(float("nan"))
            continue
        pearson.append(float(pearsonr(e, t)[0]))
        spearman.append(float(spearmanr(e, t)[0]))
    return {"pearson": float(np.nanmean(pearson)), "pearson_std": float(np.nanstd(pearson)),
            "spearman": float(np.nanmean(spearman)), "spearman_std": float(np.nanstd(spearman))}


def correlation_table(name: str, result: dict) -> pd.DataFrame:
    rows = []
    influence, timings = result["influence"], result["timings"]
    for estimator, values in influence.items():
        for truth in ("exact", "pbrf"):
            if estimator == truth:
                continue
            rows.append({"model": name, "estimator": estimator, "ground_truth": truth,
                         **correlations(values, influence[truth]), "ihvp_seconds": timings.get(estimator, float("nan"))})
    return pd.DataFrame(rows)


def _estimators_in_order(result: dict) -> list[str]:
    return ["ekfac", "kfac", "diagonal", "identity", "lissa", "exact"]


def figure(results: dict[str, dict], table: pd.DataFrame, ablation: pd.DataFrame) -> plt.Figure:
    """Row per model: scatter EK-FAC / LiSSA / identity vs PBRF; Pearson bars; Pearson vs time; damping ablation."""
    fig, axes = plt.subplots(len(results), 4, figsize=(16, 3.6 * len(results)), squeeze=False)
    colors = {"ekfac": "tab:red", "kfac": "tab:orange", "diagonal": "tab:green", "identity": "tab:gray",
              "lissa": "tab:blue", "exact": "black"}
    for row, (name, result) in zip(axes, results.items()):
        influence = result["influence"]
        truth = influence["pbrf"]
        ax = row[0]
        for estimator in ("ekfac", "lissa", "identity"):
            est = influence[estimator]
            # each query's scores divided by their std, so queries and estimators share one axis
            x = (truth / truth.std(dim=1, keepdim=True)).flatten().numpy()
            y = (est / est.std(dim=1, keepdim=True)).flatten().numpy()
            ax.scatter(x, y, s=5, alpha=0.5, color=colors[estimator], label=estimator)
        lim = np.abs(ax.get_xlim()).max()
        ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.7)
        ax.set_xlabel("PBRF influence (per-query std units)")
        ax.set_ylabel("estimate (per-query std units)")
        ax.set_title(f"{name}: estimators vs PBRF", fontsize=9)
        ax.legend(fontsize=7)

        ax = row[1]
        sub = table[(table.model == name)]
        names = _estimators_in_order(result)
        width = 0.38
        for k, gt in enumerate(("pbrf", "exact")):
            vals = [sub[(sub.estimator == e) & (sub.ground_truth == gt)] for e in names]
            means = [float(v.pearson.iloc[0]) if len(v) else np.nan for v in vals]
            stds = [float(v.pearson_std.iloc[0]) if len(v) else 0 for v in vals]
            ax.bar(np.arange(len(names)) + (k - 0.5) * width, means, width, yerr=stds, capsize=2,
                   label=f"vs {gt}", color=["tab:purple", "tab:cyan"][k])
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
        ax.set_xscale("log")
        ax.set_xlabel("IHVP wall time, s (factor fitting included)")
        ax.set_ylabel("Pearson with PBRF")
        ax.set_title(f"{name}: accuracy vs time", fontsize=9)
        ax.legend(fontsize=7)

        ax = row[3]
        ab = ablation[ablation.model == name]
        for estimator, group in ab.groupby("estimator"):
            ax.plot(group.damping_factor, group.pearson, "o-", color=colors.get(estimator), label=estimator)
        ax.set_xscale("log")
        ax.set_xlabel("damping factor (x mean EK-FAC eigenvalue)")
        ax.set_ylabel("Pearson with exact (same damping)")
        ax.set_title(f"{name}: damping ablation", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def markdown_table(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(str(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for _, r in frame.iterrows():
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values) + " |")
    return "\n".join(lines)


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, estimator): Pearson / Spearman with exact and with PBRF, and the IHVP time."""
    wide = table.pivot_table(index=["model", "estimator"], columns="ground_truth", values=["pearson", "spearman"])
    wide.columns = [f"{stat}_{gt}" for stat, gt in wide.columns]
    seconds = table.groupby(["model", "estimator"]).ihvp_seconds.first()
    out = wide.join(seconds).reset_index()
    order = {e: i for i, e in enumerate(["ekfac", "kfac", "diagonal", "identity", "lissa", "exact"])}
    out["_o"] = out.estimator.map(lambda e: order.get(e, 10 + (int(e.split("depth")[-1]) if "depth" in e else 0)))
    return out.sort_values(["model", "_o"]).drop(columns="_o")


def run_models(cfg: DictConfig) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    artifacts = Path(cfg.artifacts)
    results = {}
    for name in cfg.models:
        if name == "digits_mlp":
            setup = digits_mlp_setup(cfg.digits)
        elif name in cfg.language_models:
            setup = language_model_setup(name, cfg.language_models[name], artifacts)
        else:
            raise ValueError(f"unknown model '{name}'; choose digits_mlp or one of {list(cfg.language_models)}")
        if setup is None:
            continue
        start = time.perf_counter()
        results[name] = run_validation(setup, cfg)
        print(f"{name}: done in {time.perf_counter() - start:.0f} s")
    if not results:
        raise RuntimeError("no model was validated; check `models` and that their files exist")
    table = pd.concat([correlation_table(n, r) for n, r in results.items()], ignore_index=True)
    ablation = pd.DataFrame([row for r in results.values() for row in r["ablation"]])
    return results, table, ablation


def write_outputs(results: dict, table: pd.DataFrame, ablation: pd.DataFrame, out_dirs: Sequence[Path],
                  cfg: DictConfig, command: str) -> pd.DataFrame:
    summary = summary_table(table)
    speed = []
    for name, r in results.items():
        t = r["timings"]
        speed.append({"model": name, "ekfac_seconds": t["ekfac"], "lissa_seconds": t["lissa"],
                      "lissa_over_ekfac": t["lissa"] / t["ekfac"], "exact_seconds": t["exact"],
                      "exact_method": r["exact_method"], "pbrf_seconds": t["pbrf"], "num_parameters": r["num_parameters"],
                      "num_data": r["num_data"], "lissa_scale": r["lissa_scale"], "pbrf_epsilon": r["pbrf_epsilon"],
                      "pbrf_max_gradient": r["pbrf_max_gradient"]})
    speed = pd.DataFrame(speed)
    for out in out_dirs:
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "correlations_long.csv", index=False)
        summary.to_csv(out / "correlations.csv", index=False)
        ablation.to_csv(out / "damping_ablation.csv", index=False)
        speed.to_csv(out / "timings.csv", index=False)
        fig = figure(results, table, ablation)
        fig.savefig(out / "validation.png", dpi=110)
        plt.close(fig)
        text = ["# Validation: estimators against exact damped-GNH influence and the PBRF", "",
                f"Produced by: `{command}`", "",
                "Pearson / Spearman: per test point (query) over the scored training points, mean over test points.",
                "Damping for every method: lambda_l = damping_factor x mean EK-FAC eigenvalue of layer l "
                f"(damping_factor = {cfg.damping_factor}). `lissa` = depth N (number of data points, as in the paper); "
                "`lissa_depthK` = other depths of the same recursion. `exact` = dense GNH solve or CG on exact "
                "GNH-vector products. ihvp_seconds: wall time of the IHVP for all queries, factor fitting included "
                "(PBRF: all solves). Machine: 2 shared CPU cores, float64.", "",
                "## Correlations and timings", "", markdown_table(summary), "",
                "## EK-FAC vs LiSSA speed", "", markdown_table(speed), "",
                "## Damping ablation (Pearson / Spearman with exact at the same damping)", "",
                markdown_table(ablation.pivot_table(index=["model", "estimator"], columns="damping_factor",
                                                    values="pearson").reset_index()), "",
                "![validation](validation.png)", ""]
        (out / "README.md").write_text("\n".join(text))
        (out / "manifest.json").write_text(json.dumps(
            {"config": OmegaConf.to_container(cfg, resolve=True), "command": command,
             "layer_damping": {n: r["layer_damping"] for n, r in results.items()},
             "exact_cg": {n: r["exact_info"] for n, r in results.items()},
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
