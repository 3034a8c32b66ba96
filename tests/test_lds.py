"""Micro versions of the LDS benchmark and the add-k-copies calibration, checked against known answers.

Ridge regression retrains in closed form, so its exact influence has a known LDS (near 1) and a known calibration
(slope 1 for small epsilon); random scores have an LDS near 0. The end-to-end run uses a GPT-2 of a few thousand
parameters on licence chunks, a handful of subsets and one process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from experiments.validation.datamodels import calibration_fit, lds_table, spearman_per_query
from experiments.validation.finetune import epoch_batches

ROOT = Path(__file__).resolve().parents[1]


def ridge(x: np.ndarray, y: np.ndarray, weights: np.ndarray, damping: float) -> np.ndarray:
    """argmin_theta (1/N) sum_i w_i (x_i theta - y_i)^2 / 2 + damping |theta|^2 / 2, N = len(x) (fixed)."""
    hessian = (x.T * weights) @ x / len(x) + damping * np.eye(x.shape[1])
    return np.linalg.solve(hessian, (x.T * weights) @ y / len(x))


def ridge_problem(seed: int = 0, n: int = 400, d: int = 8, q: int = 12):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
    queries = rng.normal(size=(q, d))
    damping = 1e-3
    theta = ridge(x, y, np.ones(n), damping)
    hessian = x.T @ x / n + damping * np.eye(d)
    # influence per unit epsilon of up-weighting z's loss on f_q = x_q theta: -x_q^T H^{-1} grad L(z)
    residual = x @ theta - y
    influence = -queries @ np.linalg.solve(hessian, (x * residual[:, None]).T)  # (Q, N)
    return x, y, queries, damping, influence


def test_lds_of_exact_influence_on_ridge_regression_is_near_one_and_random_scores_near_zero():
    x, y, queries, damping, influence = ridge_problem()
    rng = np.random.default_rng(1)
    masks = np.zeros((60, len(x)), dtype=bool)
    for m in range(len(masks)):
        masks[m, rng.choice(len(x), len(x) // 2, replace=False)] = True
    # retraining on S: weights 1 on S and 0 elsewhere; two "seeds" = small independent noise on the measurement
    exact = np.stack([queries @ ridge(x, y, mask.astype(float), damping) for mask in masks])  # (M, Q)
    measured = np.stack([exact + 1e-4 * rng.normal(size=exact.shape) for _ in range(2)], axis=1)  # (M, 2, Q)
    random_scores = rng.normal(size=influence.shape)
    table, per_query = lds_table({"exact": influence, "random": random_scores}, masks, measured, resamples=200)
    table = table.set_index("method")
    assert table.loc["exact", "lds"] > 0.9, table
    assert abs(table.loc["random", "lds"]) < 0.15, table
    assert table.loc["exact", "ci_low"] <= table.loc["exact", "lds"] <= table.loc["exact", "ci_high"]
    assert table.loc["random", "ci_low"] < 0 < table.loc["random", "ci_high"]
    assert table.loc["exact", "noise_ceiling"] > 0.99  # the seeds differ by tiny noise only
    assert list(table.reset_index().columns[:5]) == ["method", "lds", "ci_low", "ci_high", "noise_ceiling"]
    assert len(per_query) == 2 * len(queries)


def test_noise_ceiling_is_the_seed_to_seed_spearman():
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(200, 5))
    measured = np.stack([signal + rng.normal(size=signal.shape) for _ in range(2)], axis=1)
    table, _ = lds_table({"m": rng.normal(size=(5, 10))}, rng.random((200, 10)) < 0.5, measured, resamples=50)
    expected = np.mean(spearman_per_query(measured[:, 0], measured[:, 1]))
    assert table.noise_ceiling.iloc[0] == pytest.approx(expected)
    assert 0.35 < expected < 0.65  # correlation of two unit-noise copies of a unit signal: 1/2
    assert table.noise_ceiling_mean.iloc[0] == pytest.approx(2 * expected / (1 + expected))


def test_calibration_on_ridge_regression_has_slope_one_for_small_epsilon():
    x, y, queries, damping, influence = ridge_problem(n=2000)
    base = queries @ ridge(x, y, np.ones(len(x)), damping)
    predicted, measured = [], []
    for z in (3, 50, 700):
        for k in (1, 2, 4, 8):
            weights = np.ones(len(x))
            weights[z] += k  # k added copies: epsilon = k / N
            measured += list(queries @ ridge(x, y, weights, damping) - base)
            predicted += list(k / len(x) * influence[:, z])
    fit = calibration_fit(np.array(predicted), np.array(measured))
    assert fit["slope"] == pytest.approx(1.0, abs=0.02) and fit["pearson"] > 0.999


def test_added_copies_leave_the_other_batches_unchanged():
    rows = list(range(20))
    plain = epoch_batches(rows, 4, np.random.default_rng(3))
    copied = epoch_batches(rows, 4, np.random.default_rng(3), copies=[7, 7], copy_generator=np.random.default_rng(9))
    assert sum(len(b) for b in copied) == 22
    assert [[r for r in b] for b in plain] == [b[:len(p)] for b, p in zip(copied, plain)]


def micro_config(artifacts: Path):
    from hydra import compose, initialize_config_dir

    overrides = [f"artifacts={artifacts}", "figures_dir=null", "processes=1", "bootstrap_resamples=20",
                 "setup.pretrain_sequences=40", "setup.num_train=24", "setup.num_queries=3", "setup.max_length=24",
                 "setup.base.hidden=16", "setup.base.heads=2", "setup.base.layers=1", "setup.base.steps=10",
                 "setup.base.vocab_size=300", "recipe.epochs=1", "recipe.batch_size=8", "subsets.count=4",
                 "calibration.num_pairs=1", "calibration.copies=[1,2]", "methods.trak.dimension=16",
                 "methods.lissa.batch_size=4"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="experiment/lds", overrides=overrides)


def test_lds_micro_end_to_end(tmp_path):
    from experiments.results import read_study
    from experiments.validation.retraining import run_lds

    cfg = micro_config(tmp_path / "artifacts")
    tables = run_lds(cfg, tmp_path / "run")
    lds = tables["lds"]
    assert list(lds.method) == list(cfg.methods.names)
    assert lds[["lds", "ci_low", "ci_high", "noise_ceiling"]].notna().all().all()
    assert ((lds.ci_low <= lds.lds + 1e-12) & (lds.lds <= lds.ci_high + 1e-12)).all()
    assert (tmp_path / "run" / "lds.csv").exists() and (tmp_path / "run" / "calibration.csv").exists()
    record = read_study(tmp_path / "run")
    assert record.study == "lds" and {"lds", "calibration", "timings"} <= set(record.tables)
    pairs = pd.read_csv(tmp_path / "run" / "calibration_pairs.csv")
    assert np.allclose(pairs.influence_per_copy_ekfac * 24, pairs.influence_per_epsilon_ekfac)
    assert np.allclose(pairs.predicted_ekfac, pairs.copies * pairs.influence_per_copy_ekfac)
    scores = pd.read_parquet(tmp_path / "run" / "scores.parquet")
    ekfac = scores[scores.method == "ekfac"]
    assert np.allclose(ekfac.influence_per_copy * 24, ekfac.influence)
    # every retrain is cached: a second run retrains nothing and gives the same table
    retrains = sorted((tmp_path / "artifacts" / "lds").glob("*/retrains/*_seed*.json"))
    assert len(retrains) == 4 * 2 + 2 + 1 * 2 * 2
    mtimes = [p.stat().st_mtime for p in retrains]
    again = run_lds(cfg, tmp_path / "run2")
    assert [p.stat().st_mtime for p in retrains] == mtimes
    pd.testing.assert_frame_equal(again["lds"], lds)
