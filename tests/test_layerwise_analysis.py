"""Layer-wise helpers against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from analysis.layerwise import bands, block_index, centre_of_mass, layer_shares, per_block


def test_block_index_of_module_paths():
    assert block_index("gpt_neox.layers.3.mlp.dense_h_to_4h") == 3
    assert block_index("transformer.h.11.mlp.c_fc") == 11
    with pytest.raises(ValueError, match="block index"):
        block_index("lm_head")


def test_per_block_sums_the_matrices_of_each_block():
    names = ["m.layers.0.mlp.a", "m.layers.0.mlp.b", "m.layers.1.mlp.a", "m.layers.1.mlp.b"]
    per_layer = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    blocks, ids = per_block(per_layer, names)
    assert ids == [0, 1] and blocks.tolist() == [[3.0, 7.0]]


def test_shares_centre_of_mass_and_bands():
    influence = torch.tensor([[1.0, 0.0, 3.0], [0.0, 2.0, 0.0]])
    assert layer_shares(influence).tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert centre_of_mass(influence).tolist() == pytest.approx([0.75, 0.5])
    assert bands(7) == {"lower": [0, 1, 2], "middle": [3, 4], "upper": [5, 6]}
    with pytest.raises(ValueError, match="thirds"):
        bands(2)


def test_verdict_statistics_on_hand_made_rows():
    import numpy as np

    from analysis.bootstrap import nested_bootstrap
    from analysis.layerwise import kind_difference, middle_minus_others, peak_of_mean_profile

    profiles = np.array([[2.0, 0.0], [1.0, 1.0]])  # mean profile (1.5, 0.5): the peak is 1.5x uniform
    assert peak_of_mean_profile(profiles) == 1.5
    assert kind_difference(np.array([[0.8, 1], [0.6, 1], [0.3, 0]])) == pytest.approx(0.4)
    assert np.isnan(kind_difference(np.array([[0.8, 1]])))
    assert middle_minus_others(np.array([[0.5, 0.2, 0.4], [0.3, 0.3, 0.6]])) == pytest.approx(((0.2 - 0.4) + 0) / 2)
    # identical units: the CI collapses onto the estimate; two seeds that differ: the CI spans both seeds' values
    same = nested_bootstrap([np.tile([1.0, 1.0], (5, 1))], peak_of_mean_profile, n_resamples=200)
    assert same.estimate == same.low == same.high == 1.0
    seeds = nested_bootstrap([np.tile([2.0, 0.0], (4, 1)), np.tile([1.0, 1.0], (4, 1))], peak_of_mean_profile,
                             n_resamples=400)
    assert seeds.estimate == 1.5 and seeds.low <= 1.0 + 1e-9 and seeds.high >= 2.0 - 1e-9 and seeds.n == 2
