"""Influence split over layers (paper Sec 5.3.2, Eq 30, Figs 17-21).

Tracked matrices are grouped into transformer blocks by the layer index in their module path
("gpt_neox.layers.3.mlp.dense_h_to_4h" -> block 3). Depth is reported as block / (blocks - 1) in [0, 1].
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch


def block_index(layer_name: str) -> int:
    """The transformer block of a module path: the first integer path component."""
    match = re.search(r"\.(\d+)\.", f".{layer_name}.")
    if match is None:
        raise ValueError(f"cannot find a block index in the layer name '{layer_name}'")
    return int(match.group(1))


def per_block(per_layer: torch.Tensor, layer_names: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
    """Sum the per-layer influence (..., L) of the matrices in each block -> (..., blocks), sorted block ids."""
    blocks = sorted({block_index(n) for n in layer_names})
    out = torch.zeros(*per_layer.shape[:-1], len(blocks), dtype=per_layer.dtype)
    for j, name in enumerate(layer_names):
        out[..., blocks.index(block_index(name))] += per_layer[..., j]
    return out, blocks


def layer_shares(block_influence: torch.Tensor) -> torch.Tensor:
    """Share of each block in the summed influence of the given sequences: (N, B) -> (B,), sums to 1."""
    totals = block_influence.sum(dim=0)
    return totals / totals.sum()


def centre_of_mass(block_influence: torch.Tensor) -> torch.Tensor:
    """Relative depth in [0, 1] at which a sequence's positive influence sits: (N, B) -> (N,)."""
    positive = block_influence.clamp_min(0)
    depth = torch.linspace(0, 1, block_influence.shape[-1], dtype=block_influence.dtype)
    return (positive * depth).sum(-1) / positive.sum(-1).clamp_min(1e-30)


def bands(num_blocks: int) -> dict[str, list[int]]:
    """Lower, middle and upper thirds of the blocks (positions 0..num_blocks-1); needs at least 3 blocks."""
    if num_blocks < 3:
        raise ValueError(f"{num_blocks} blocks cannot be split into thirds; use a model with at least 3 layers")
    edges = np.array_split(np.arange(num_blocks), 3)
    return {"lower": edges[0].tolist(), "middle": edges[1].tolist(), "upper": edges[2].tolist()}


# ---- statistics of the verdicts: each a function of a (units, ...) array, resampled by analysis.bootstrap ------

def peak_of_mean_profile(profiles: np.ndarray) -> float:
    """profiles (Q, D): per query its share of influence per block times the number of blocks (1 = uniform).
    Returns max_d mean_q profiles[q, d], the largest block's share of the average profile over uniform."""
    return float(np.asarray(profiles, dtype=np.float64).mean(axis=0).max())


def kind_difference(rows: np.ndarray) -> float:
    """rows (n, 2): [value, 1 for kind a / 0 for kind b]. mean(value | a) - mean(value | b); NaN when a kind is
    absent (a bootstrap replicate without it is left out)."""
    rows = np.asarray(rows, dtype=np.float64)
    a, b = rows[rows[:, 1] == 1, 0], rows[rows[:, 1] == 0, 0]
    return float(a.mean() - b.mean()) if len(a) and len(b) else float("nan")


def middle_minus_others(rows: np.ndarray) -> float:
    """rows (Q, 3): per query a statistic of the top sequences ranked by the lower, middle and upper third of the
    layers. mean_q (middle_q - min(lower_q, upper_q)): < 0 when the middle third gives the lowest value."""
    rows = np.asarray(rows, dtype=np.float64)
    return float((rows[:, 1] - np.minimum(rows[:, 0], rows[:, 2])).mean())
