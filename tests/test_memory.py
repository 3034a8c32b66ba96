"""Memory planning from shapes alone: known byte counts on a hand-made layer, the batch chosen for a budget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from influence_core import track_layers
from influence_core.memory import GIB, plan_memory, plan_output_blocks

ROOT = Path(__file__).resolve().parents[1]


class OneLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Linear(3, 5)  # d_in = 3 + 1 (bias), d_out = 5


def test_byte_counts_of_one_layer():
    model = OneLayer()
    plan = plan_memory(track_layers(model, ["*mlp*"]), model, tokens=7, queries=2, query_rank=None, batch_size=4)
    layer = plan.layers[0]
    assert (layer.d_in, layer.d_out) == (4, 5)
    assert layer.factors == (16 + 25 + 20) * 4 and layer.covariance == (16 + 25) * 4
    assert layer.eigendecomposition == 3 * 25 * 8
    assert layer.correction_per_sequence == 2 * 20 * 4 and layer.scoring_per_sequence == 20 * 4
    assert layer.queries == 2 * 20 * 4 and layer.captures_per_token == 9 * 4
    weights = 20 * 4  # 15 weights + 5 biases, float32
    assert plan.weights == weights
    captures = 4 * 7 * 9 * 4
    assert plan.stages["scoring"] == (weights + captures + layer.factors + layer.queries
                                      + 4 * layer.scoring_per_sequence)
    pooled = plan_memory(track_layers(model, ["*mlp*"]), model, tokens=7, queries=2, query_rank=None, batch_size=4,
                         pool_bytes=1000)  # training batches pooled for the dense contraction (opt-in)
    assert pooled.stages["scoring"] == plan.stages["scoring"] + 1000
    ranked = plan_memory(track_layers(model, ["*mlp*"]), model, tokens=7, queries=2, query_rank=1, batch_size=4)
    assert ranked.layers[0].queries == 2 * 1 * (5 + 4) * 4
    dense_copy = 2 * 20 * 4  # the rank-1 queries rebuilt dense for the cheaper contraction
    assert ranked.stages["scoring"] == (weights + captures + layer.factors + ranked.layers[0].queries + dense_copy
                                        + 4 * layer.scoring_per_sequence)


def test_largest_batch_that_fits_and_a_clear_refusal():
    model = OneLayer()
    layers = track_layers(model, ["*mlp*"])
    one = plan_memory(layers, model, tokens=7, batch_size=1).peak
    two = plan_memory(layers, model, tokens=7, batch_size=2).peak
    chosen = plan_memory(layers, model, tokens=7, budget=two + 1)
    assert chosen.batch_size == 2 and chosen.peak <= two + 1
    with pytest.raises(ValueError, match=r"does not fit .* the largest layer is mlp \(5 x 4\)"):
        plan_memory(layers, model, tokens=7, budget=one - 1)


def test_plan_command_for_pythia_410m_from_its_config_alone():
    result = subprocess.run([sys.executable, "-m", "experiments.cli", "plan", "pythia-410m", "--budget-gib", "80"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "48 tracked layers" in result.stdout and "(fits)" in result.stdout
    assert "gpt_neox.layers.23.mlp.dense_4h_to_h" in result.stdout and "4097   1024" in result.stdout
    too_big = subprocess.run([sys.executable, "-m", "experiments.cli", "plan", "pythia-12b", "--budget-gib", "40"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert too_big.returncode != 0 and "does not fit 40.00 GiB even with 1024 output blocks" in too_big.stderr


class WideOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Linear(3, 64)  # d_in = 4, d_out = 64: S (64 x 64) dominates the factors


def test_byte_counts_with_output_blocks():
    model = OneLayer()
    layer = plan_memory(track_layers(model, ["*mlp*"]), model, tokens=7, queries=2, query_rank=None, batch_size=4,
                        output_blocks=5).layers[0]
    assert layer.factors == (16 + 5 * 1 + 20) * 4 and layer.covariance == (16 + 5) * 4  # S: five 1 x 1 blocks
    assert layer.eigendecomposition == 3 * 16 * 8  # the larger factor is now A
    assert layer.correction_per_sequence == 2 * 1 * 4 * 4 and layer.scoring_per_sequence == 1 * 4 * 4
    with pytest.raises(ValueError, match="output_blocks=2 does not divide d_out=5"):
        plan_memory(track_layers(model, ["*mlp*"]), model, tokens=7, batch_size=1, output_blocks=2)


def test_plan_picks_the_fewest_output_blocks_that_fit():
    model = WideOutput()
    layers = track_layers(model, ["*mlp*"])
    peaks = {k: plan_memory(layers, model, tokens=7, query_rank=None, batch_size=1, output_blocks=k).peak
             for k in (None, 2, 4, 8)}
    assert peaks[None] > peaks[2] > peaks[4] > peaks[8]
    plan = plan_output_blocks(layers, model, 7, peaks[4], query_rank=None)
    assert plan.output_blocks == 4 and plan.peak <= peaks[4]
    assert plan_output_blocks(layers, model, 7, peaks[None], query_rank=None).output_blocks is None  # fits whole
    with pytest.raises(ValueError, match="even with 64 output blocks"):
        plan_output_blocks(layers, model, 7, 1000, query_rank=None)


def test_plan_command_says_how_many_output_blocks_make_pythia_12b_fit():
    result = subprocess.run([sys.executable, "-m", "experiments.cli", "plan", "pythia-12b", "--budget-gib", "139"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "output blocks: 4" in result.stdout and "(fits)" in result.stdout
    assert "with 4 output blocks (influence.output_blocks=4" in result.stdout
