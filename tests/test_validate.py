"""Micro version of the validation study: every estimator and both ground truths, end to end, in seconds."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from engine_models import gpt_neox, query_batches, token_batches
from influence_core import CausalLMTask

ROOT = Path(__file__).resolve().parents[1]


def micro_config(artifacts: Path, *extra: str):
    overrides = [
        "models=[digits_mlp]", f"artifacts={artifacts}", "figures_dir=null", "threads=1", "progress=false",
        "digits.hidden=8", "digits.layers=1", "digits.epochs=150", "digits.num_train=100", "digits.num_scored=8",
        "digits.num_test=2", "lissa.depth_multiple=1", "lissa.snapshot_multiples=[0.5,1]", "lissa.batch_size=4",
        "damping_ablation=[0.1,1.0]", "exact.dense_limit=1000", "exact.cg_tolerance=1e-8",
        "exact.cg_max_iterations=300", "pbrf.max_iterations=40", "pbrf.gradient_tolerance=1e-6",
        "diagnostics.fit_examples=[4,100]", *extra,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="experiment/validate", overrides=overrides)


def tiny_language_model_setup():
    """A 2-layer GPT-NeoX (424 tracked parameters), random token data: the CG path of the exact ground truth."""
    from experiments.validation.setups import ValidationSetup

    def concat(batches):
        return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}

    data = concat(token_batches(8, seed=7, pad_last=False))
    return ValidationSetup("tiny_lm", gpt_neox(seed=2), CausalLMTask(), ["*mlp*"], data,
                           {k: v[:4] for k, v in data.items()}, concat(query_batches(n=2)), ["q0", "q1"],
                           fisher="sampled", batch_size=8)


def test_validate_micro(tmp_path, monkeypatch):
    import experiments.validate as validate
    from experiments.validation import setups

    cfg = micro_config(tmp_path, "exact.dense_limit=500")  # digits MLP (610 parameters) -> CG, tiny LM (424) -> dense
    real_setup = setups.language_model_setup
    monkeypatch.setattr(setups, "language_model_setup",
                        lambda name, c, a: tiny_language_model_setup() if name == "tiny_lm" else real_setup(name, c, a))
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.models = ["digits_mlp", "tiny_lm"]
        cfg.language_models["tiny_lm"] = {}
    summary = validate.run(cfg, tmp_path)
    for name in ("correlations.csv", "correlations_long.csv", "damping_ablation.csv", "timings.csv", "validation.png",
                 "README.md", "study.json", "pbrf_convergence.csv", "damping.csv", "diagnostics.csv", "eigenbasis.csv"):
        assert (tmp_path / name).exists(), name
    assert set(summary.model) == {"digits_mlp", "tiny_lm"}
    table = pd.read_csv(tmp_path / "correlations_long.csv")
    pbrf_vs_exact = table[(table.estimator == "exact") & (table.ground_truth == "pbrf")].set_index("model")
    # the PBRF's derivative at eps -> 0 is the damped-GNH influence: they agree (CG on the MLP, dense G on the LM)
    assert (pbrf_vs_exact.pearson > 0.999).all(), pbrf_vs_exact
    convergence = pd.read_csv(tmp_path / "pbrf_convergence.csv").set_index(["model", "ground_truth"])
    assert set(convergence.index) == {("digits_mlp", "pbrf"), ("tiny_lm", "pbrf"), ("tiny_lm", "pbrf_one_copy")}
    small_eps = convergence.xs("pbrf", level="ground_truth")
    assert (small_eps.solves_converged == small_eps.solves).all(), small_eps
    assert (small_eps.max_estimated_error <= 1e-3).all() and (pbrf_vs_exact.excluded == 0).all()
    # eps = 1/N = 1/8 is far from linear; whatever did not converge is counted and left out of the correlations
    one_copy = convergence.loc[("tiny_lm", "pbrf_one_copy")]
    row = table[(table.model == "tiny_lm") & (table.estimator == "exact") & (table.ground_truth == "pbrf_one_copy")]
    assert int(row.excluded.iloc[0]) == int(one_copy.points_excluded) and int(row.points.iloc[0]) == 4 - int(one_copy.points_excluded)
    ekfac = table[(table.estimator == "ekfac") & (table.ground_truth == "exact")].set_index("model")
    identity = table[(table.estimator == "identity") & (table.ground_truth == "exact")].set_index("model")
    # observed on the tiny LM: ekfac 0.92, identity 0.36 (the 8-point digits run is too small to rank estimators)
    assert ekfac.loc["tiny_lm", "pearson"] > 0.8
    assert ekfac.loc["tiny_lm", "pearson"] > identity.loc["tiny_lm", "pearson"]
    timings = pd.read_csv(tmp_path / "timings.csv").set_index("model")
    assert timings.loc["digits_mlp", "exact_method"] == "cg" and timings.loc["tiny_lm", "exact_method"] == "dense"
    ablation = pd.read_csv(tmp_path / "damping_ablation.csv")
    assert set(ablation.damping_factor) == {0.1, 1.0}
    # dense models also get the layer-wise exact solve: a ground truth of its own in the ablation, an estimator here
    assert set(ablation[ablation.model == "tiny_lm"].ground_truth) == {"exact", "exact_layerwise"}
    assert "exact_layerwise" in set(table[table.model == "tiny_lm"].estimator)
    basis = pd.read_csv(tmp_path / "eigenbasis.csv")
    assert len(basis) == 4 and (basis.offdiagonal.between(0, 1)).all()  # tiny_lm: sampled Fisher, so no exactness check
    diagnostics = pd.read_csv(tmp_path / "diagnostics.csv")
    assert set(diagnostics.model) == {"tiny_lm"} and set(diagnostics.diagnostic) == {"fitting examples", "tracked layers"}
    damping = pd.read_csv(tmp_path / "damping.csv")
    assert len(damping[damping.model == "tiny_lm"]) == 4 and (damping.damping > 0).all()
    readme = (tmp_path / "README.md").read_text()
    assert "Produced by" in readme and "## PBRF solves" in readme
    from experiments.results import read_study

    record = read_study(tmp_path)
    assert record.study == "validate" and {"correlations", "timings"} <= set(record.tables)
    assert [m.name for m in record.models] == ["digits_mlp", "tiny_lm"] and record.figures == {"validation": "validation.png"}


def test_validate_rejects_unknown_model(tmp_path):
    from experiments.validate import run_models

    with pytest.raises(ValueError, match="unknown model 'nope'"):
        run_models(micro_config(tmp_path, "models=[nope]"))


def test_ekfac_eigenvalues_are_the_exact_gnh_diagonal_in_their_eigenbasis():
    """With the expected Fisher on the same data, EK-FAC's corrected eigenvalues are exactly diag(Q^T G_l Q) of the
    dense GNH (same normalisation, no sampling); the Kronecker eigenbasis does not diagonalise G_l, though."""
    from engine_models import ClassificationTask, classification_batches, mlp_classifier
    from experiments.validation.diagnostics import eigenbasis_check
    from influence_core import FactorArguments, fit_factors, track_layers
    from influence_core.reference.baselines import exact_gauss_newton

    model = mlp_classifier(seed=1)
    layers = track_layers(model, ["*"])
    data = classification_batches(20, seed=2, batch_size=8)
    gnh = exact_gauss_newton(model, layers, ClassificationTask(), data)
    ekfac = fit_factors(model, layers, ClassificationTask(), data,
                        FactorArguments(strategy="ekfac", fisher="expected", dtype="float64", progress=False))
    rows = eigenbasis_check("mlp", layers, gnh, ekfac, "expected")
    assert [r["layer"] for r in rows] == [l.name for l in layers]
    assert max(r["correction_error"] for r in rows) < 1e-10
    assert all(0.01 < r["offdiagonal"] < 1 for r in rows)


def test_unconverged_ground_truths_are_flagged():
    """A CG solve above its tolerance, or a PBRF with fewer than half its points converged, is named in a warning."""
    from omegaconf import OmegaConf

    from experiments.validation.metrics import ground_truth_warnings

    cfg = OmegaConf.create({"exact": {"cg_tolerance": 1e-4}})
    table = pd.DataFrame([
        {"model": "a", "estimator": "ekfac", "ground_truth": "pbrf", "points": 9, "excluded": 1},
        {"model": "b", "estimator": "ekfac", "ground_truth": "pbrf", "points": 1, "excluded": 9},
        {"model": "b", "estimator": "kfac", "ground_truth": "pbrf", "points": 1, "excluded": 9},
        {"model": "b", "estimator": "ekfac", "ground_truth": "exact", "points": 10, "excluded": 0},
    ])
    results = {"a": {"exact_info": {"iterations": 40, "relative_residual": [5e-5, 9e-5]}},
               "b": {"exact_info": {"iterations": 1000, "relative_residual": [2e-3, 8e-3]}}}
    warnings = ground_truth_warnings(results, table, cfg)
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("b: the CG solve") and "8.0e-03" in warnings[0]
    assert warnings[1].startswith("b: only 1 of 10 training points converged for `pbrf`")
    assert ground_truth_warnings({"a": {"exact_info": None}}, table[table.model == "a"], cfg) == []


def test_dense_solve_info_takes_the_eigenvalues_of_the_one_eigendecomposition():
    """With the PBRF, comparison.py decomposes G + lambda once and hands its eigenvalues over: the same report as
    the eigvalsh that dense_solve_info runs without them."""
    from experiments.validation.ground_truth import damped_system, dense_solve_info

    generator = torch.Generator().manual_seed(0)
    root = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    gnh, damping, rhs = root @ root.T, torch.tensor(0.3, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    solution = torch.linalg.solve(damped_system(gnh, damping), rhs.T).T
    alone = dense_solve_info(gnh, damping, rhs, solution)
    given = dense_solve_info(gnh, damping, rhs, solution, torch.linalg.eigh(damped_system(gnh, damping))[0])
    assert alone == pytest.approx(given, rel=1e-12)
    assert alone["eigenvalue_min"] == pytest.approx(float(torch.linalg.eigvalsh(gnh)[0]) + 0.3, rel=1e-10)
