"""The exact dense-G ground truth on a zoo LM (issue 18.3), in seconds: the position-local Gauss-Newton Hessian
against two independent exact ones, its refusal where attention runs after a layer, and the `zoo_2xs_dense` validation
entry end to end on the micro zoo, its numbers checked against brute-force solves."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from engine_models import gpt2, gpt_neox, token_batches
from influence_core import CausalLMTask, iterate_batches, track_layers
from influence_core.reference.baselines import exact_gauss_newton, exact_ihvp, parameter_gradients, position_local_gauss_newton
from influence_core.reference.gnh import gnh_vector_product, layer_damping_vector
from zoo_fixtures import micro_zoo  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("make, patterns", [
    (gpt_neox, ["gpt_neox.layers.1.mlp.*"]),            # parallel residual: the MLP's output reaches its own position only
    (gpt2, ["transformer.h.1.mlp.*", "transformer.h.1.attn.c_proj"]),  # Conv1D (transposed weights), 3 layers
])
def test_position_local_gnh_is_the_per_class_gnh(make, patterns):
    """Same G, cross-layer blocks and padding included, as one backward pass per (position, class)."""
    model = make(seed=1)
    layers = track_layers(model, patterns)
    batches = list(token_batches(6, seed=3))  # the first sequence right-padded
    per_class = exact_gauss_newton(model, layers, CausalLMTask(), batches)
    local = position_local_gauss_newton(model, layers, CausalLMTask(), batches)
    assert float((local - per_class).norm() / per_class.norm()) < 1e-12


def micro_data(zoo, rows: int = 4):
    from experiments.loading import load_model_and_tokenizer, load_text_dataset, tokenize_sequences
    from experiments.pipeline import training_batches

    model, tokenizer = load_model_and_tokenizer(zoo.model_path)
    texts = load_text_dataset(zoo.dataset_path)
    encoded = tokenize_sequences(texts.select(range(rows)), tokenizer, max_length=24, truncation=True)
    encoded.pop("lengths")
    return model.double().eval(), training_batches(encoded, rows)[0]


def test_position_local_gnh_on_the_micro_zoo_equals_gnh_vector_products(micro_zoo):
    """G v from the dense position-local G equals the double-backward GNH-vector product through the whole model."""
    model, data = micro_data(micro_zoo)
    layers = track_layers(model, ["gpt_neox.layers.1.attention.dense", "gpt_neox.layers.1.mlp.dense_4h_to_h"])
    batches = iterate_batches(data, 2)
    gnh = position_local_gauss_newton(model, layers, CausalLMTask(), batches)
    vectors = torch.randn(2, gnh.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    products = gnh_vector_product(model, layers, CausalLMTask(), batches, vectors)
    assert float((vectors @ gnh - products).norm() / products.norm()) < 1e-10
    assert float((gnh - gnh.T).abs().max() / gnh.abs().max()) < 1e-14


def test_position_local_gnh_refuses_a_layer_that_attention_reads(micro_zoo):
    model, data = micro_data(micro_zoo, rows=2)
    layers = track_layers(model, ["gpt_neox.layers.0.mlp.dense_4h_to_h"])
    with pytest.raises(ValueError, match="reach the logits of other positions"):
        position_local_gauss_newton(model, layers, CausalLMTask(), iterate_batches(data, 2))


def zoo_dense_config(zoo, artifacts: Path):
    """The zoo_2xs_dense entry on the micro zoo; tracked: the last block's attention output (32 x 33), a position-local
    layer like the entry's MLP output but 4x smaller, so its dense solves take milliseconds."""
    entry = "language_models.zoo_2xs_dense"
    overrides = [
        "models=[zoo_2xs_dense]", f"artifacts={artifacts}", "figures_dir=null", "threads=1", "progress=false",
        f"{entry}.model_path={zoo.model_path}", f"{entry}.dataset_path={zoo.dataset_path}",
        f"{entry}.queries_path={zoo.queries_path}", f"{entry}.module_patterns=[gpt_neox.layers.1.attention.dense]",
        f"{entry}.num_data=12", f"{entry}.num_scored=8", f"{entry}.num_queries=2", f"{entry}.max_length=24",
        "lissa.snapshot_multiples=[0.5,1]", "damping_ablation=[0.1,1.0]", "diagnostics.enabled=false",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="experiment/validate", overrides=overrides)


def test_validate_zoo_dense_micro(micro_zoo, tmp_path):
    """The zoo_2xs_dense entry on the micro zoo: exact influence = q^T (G + lambda)^{-1} g with x = (G + lambda)^{-1} q
    checked by GNH-vector products; identity = the plain gradient dot product; every solve's convergence reported."""
    from experiments.validation.comparison import model_setup, run_models
    from experiments.validation.report import write_outputs

    cfg = zoo_dense_config(micro_zoo, tmp_path / "artifacts")
    results, table, ablation = run_models(cfg)
    write_outputs(results, table, ablation, tmp_path, None, cfg, "test")
    result = results["zoo_2xs_dense"]
    assert result["exact_method"] == "dense" and result["gauss_newton"] == "position_local"
    assert result["num_scored"] == 8 and len(result["query_names"]) == 2
    assert all(name.startswith("fact_") for name in result["query_names"])  # query_study: facts

    # brute force on the same setup: per-example gradients, and a solve verified against GNH-vector products
    setup = model_setup("zoo_2xs_dense", cfg)
    layers = track_layers(setup.model, setup.patterns)
    task, batches = setup.task, iterate_batches(setup.data, setup.batch_size)
    train = parameter_gradients(setup.model, layers, task, iterate_batches(setup.scored, 4))  # (M, P)
    query = parameter_gradients(setup.model, layers, task, iterate_batches(setup.queries, 4), loss="query")  # (Q, P)
    damping = layer_damping_vector(layers, result["layer_damping"])
    solution = exact_ihvp(position_local_gauss_newton(setup.model, layers, task, batches), query, damping)
    residual = gnh_vector_product(setup.model, layers, task, batches, solution) + damping * solution - query
    assert float(residual.norm() / query.norm()) < 1e-9  # x solves the system of the true G, not of an approximation
    for estimator, expected in [("exact", solution @ train.T), ("identity", query @ train.T)]:
        got = result["influence"][estimator]
        assert float((got - expected).norm() / expected.norm()) < 1e-8, estimator

    solves = pd.read_csv(tmp_path / "exact_solves.csv").iloc[0]
    assert solves.exact_method == "dense" and solves.dense_max_relative_residual < 1e-10
    assert solves.condition_number > 1 and 0 < solves.lissa_slowest_rate < 1
    lissa = pd.read_csv(tmp_path / "lissa_convergence_long.csv")
    assert sorted(set(lissa.depth)) == [6, 12] and len(lissa) == 4  # depth N/2 and N, per query
    assert lissa.relative_residual.between(0, 10).all() and lissa.relative_error.notna().all()
    summary = pd.read_csv(tmp_path / "correlations.csv").set_index("estimator")
    assert {"ekfac", "kfac", "identity", "lissa", "exact_layerwise"} <= set(summary.index)
    assert "pearson_pbrf" not in summary and summary.loc["exact_layerwise", "pearson_exact"] > 0.999999
    assert "pbrf" not in result["influence"] and result["convergence"] == []  # pbrf: false
    readme = (tmp_path / "README.md").read_text()
    assert "position_local" in readme and "## Convergence of the solves" in readme and "Not run" in readme
