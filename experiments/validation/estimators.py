"""The estimators under test, all on the same tracked layers and the same absolute damping per layer.

- factor strategies (influence_core.fit_factors): EK-FAC, K-FAC, diagonal, identity (gradient dot product);
  each preconditions a query gradient q_l layer by layer: (G_l + lambda_l)^{-1} q_l (paper Eq 21);
- LiSSA (reference.lissa_ihvp): the stochastic Neumann recursion on exact GNH-vector products, depth N (paper).
Damping: lambda_l = damping_factor x mean EK-FAC eigenvalue of layer l (paper: 0.1), for every method.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import torch

from influence_core import FactorArguments, Factors, TrackedLayer, fit_factors
from influence_core.reference.baselines import flatten_layers, unflatten_layers
from influence_core.reference.lissa import LissaArguments, LissaResult, lissa_ihvp

FACTOR_STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")


def timed(fn: Callable):
    """(fn(), wall seconds)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def fit_strategies(model, layers, task, batches, fisher: str, seed: int,
                   strategies: Sequence[str] = FACTOR_STRATEGIES) -> tuple[dict[str, Factors], dict[str, float]]:
    """{strategy: Factors} fitted in float64 on `batches`, and the seconds each fit took."""
    factors, seconds = {}, {}
    for strategy in strategies:
        args = FactorArguments(strategy=strategy, fisher=fisher, dtype="float64", seed=seed, progress=False)
        factors[strategy], seconds[strategy] = timed(lambda: fit_factors(model, layers, task, batches, args))
    return factors, seconds


def layer_damping(ekfac: Factors, layers: Sequence[TrackedLayer], damping_factor: float) -> dict[str, float]:
    """lambda_l = damping_factor x mean EK-FAC eigenvalue of layer l: one absolute value per layer."""
    return {l.name: damping_factor * float(ekfac.layers[l.name].eigenvalues.mean()) for l in layers}


def precondition(factors: Factors, gradients: Mapping[str, torch.Tensor],
                 damping_by_layer: Mapping[str, float], power: float = 1.0) -> dict[str, torch.Tensor]:
    """{layer: (G_l + lambda_l)^{-power} g_l} for g_l of shape (..., d_out, d_in)."""
    return {name: factors.layers[name].precondition(g, damping_by_layer[name], power) for name, g in gradients.items()}


def factor_operator(factors: Factors, layers, damping_by_layer: Mapping[str, float], power: float = 1.0) -> Callable:
    """v (K, P) -> (G_factored + lambda)^{-power} v, layer by layer in the factors' eigenbasis (Eq 21):
    Q_S [(Q_S^T V Q_A) / (Lambda + lambda)^power] Q_A^T. power 1: the IHVP; 1/2: a symmetric square root."""

    def apply(v: torch.Tensor) -> torch.Tensor:
        return flatten_layers(layers, precondition(factors, unflatten_layers(layers, v.double()), damping_by_layer,
                                                   power))

    return apply


def lissa_snapshots(num_data: int, depth: int, multiples: Sequence[float]) -> list[int]:
    """The depths at which LiSSA's estimate is kept: multiples of N up to `depth`, always N and `depth`."""
    return sorted({max(1, int(f * num_data)) for f in multiples if f * num_data <= depth} | {depth, num_data})


def run_lissa(model, layers, task, data: Mapping[str, torch.Tensor], q_flat: torch.Tensor, damping: torch.Tensor,
              depth_multiple: float, lissa_cfg, seed: int, progress: bool = False) -> tuple[LissaResult, LissaArguments]:
    """LiSSA to depth `depth_multiple` x N (at least N, the paper's depth), snapshots at lissa_cfg.snapshot_multiples."""
    num_data = len(next(iter(data.values())))
    depth = int(depth_multiple * num_data)
    if depth < num_data:
        raise ValueError(f"LiSSA depth multiple {depth_multiple} < 1: the paper's depth (N = {num_data}) must be reached")
    args = LissaArguments(depth=depth, batch_size=min(lissa_cfg.batch_size, num_data), repeats=lissa_cfg.repeats,
                          scale_factor=lissa_cfg.scale_factor, seed=seed,
                          snapshots=lissa_snapshots(num_data, depth, lissa_cfg.snapshot_multiples), progress=progress)
    return lissa_ihvp(model, layers, task, data, q_flat, damping, args), args
