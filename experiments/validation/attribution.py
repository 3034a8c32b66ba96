"""Attribution scores of every training sequence for every query, by each method of the LDS benchmark: (Q, N) each.

All at the fine-tuned weights theta*, on the same tracked layers, with q = grad(-f) the query gradient and
r(z) = grad L(z) the sequence's summed training loss gradient (influence_core/scores.py's sign convention:
positive = adding z raises log p(completion)); one absolute damping per layer, lambda_l = damping_factor x mean
EK-FAC eigenvalue of layer l, wherever a method inverts a curvature.

    ekfac, kfac, diagonal   q^T (G_l + lambda_l)^{-1} r, layer by layer (influence_core factor strategies)
    identity                q^T r  (the gradient dot product)
    lissa                   q^T (G + lambda)^{-1} r by LiSSA at depth N (the whole G, cross-layer blocks included)
    trackstar               cos(P q, P r) with P = (G_ekfac + lambda)^{-1/2}: unit-normalised preconditioned gradients
                            (Chang et al. 2024, with EK-FAC in place of their optimizer second moments; no projection)
    trak                    phi_q^T (Phi^T Phi / N + lambda_phi)^{-1} phi_z with phi = Pi^T r, Pi (P, k) Gaussian /
                            sqrt(k): one model's TRAK-style random-projection score (Park et al. 2023, no ensemble),
                            lambda_phi = damping_factor x mean eigenvalue of Phi^T Phi / N
    bm25                    BM25 of the query text (prompt + completion) against the sequence text

Units: ekfac, kfac, diagonal, lissa and trak are influence per unit epsilon (nats of log p(completion) when z's loss
is up-weighted by epsilon next to the mean training loss); divide by N for the influence of one added copy.
identity is per unit learning rate of one gradient step, trackstar a cosine, bm25 a text score: only their ranks
matter for the LDS.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import DictConfig

from influence_core import BM25Index, CausalLMTask, iterate_batches, query_gradients, track_layers
from influence_core.reference.baselines import flatten_layers, parameter_gradients
from influence_core.reference.gnh import layer_damping_vector

from .estimators import FACTOR_STRATEGIES, factor_operator, fit_strategies, layer_damping, precondition, run_lissa

METHODS = ("ekfac", "kfac", "diagonal", "identity", "lissa", "trackstar", "trak", "bm25")
EPSILON_UNITS = ("ekfac", "kfac", "diagonal", "lissa", "trak")  # influence per unit epsilon (calibrated units)


@dataclass
class Attribution:
    scores: dict[str, np.ndarray]  # method -> (Q, N)
    seconds: dict[str, float]  # method -> wall seconds (shared gradients counted once, under `gradients`)
    layer_damping: dict[str, float]
    layers: list[str]
    num_parameters: int
    lissa: dict = field(default_factory=dict)  # scale, depth


def trak_scores(q_flat: torch.Tensor, r_flat: torch.Tensor, dimension: int, damping_factor: float,
                seed: int) -> np.ndarray:
    """phi_q^T (Phi^T Phi / N + lambda)^{-1} Phi^T: q (Q, P), r (N, P) -> (Q, N); Pi (P, k) ~ N(0, 1/k)."""
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(r_flat.shape[1], dimension, generator=generator, dtype=torch.float64) / dimension ** 0.5
    phi, phi_q = r_flat @ projection, q_flat @ projection  # (N, k), (Q, k)
    kernel = phi.T @ phi / len(phi)
    damping = damping_factor * float(torch.linalg.eigvalsh(kernel).clamp_min(0).mean())
    solved = torch.linalg.solve(kernel + damping * torch.eye(dimension, dtype=kernel.dtype), phi_q.T)  # (k, Q)
    return (solved.T @ phi.T).numpy()


def attribution_scores(model: torch.nn.Module, data: dict[str, torch.Tensor], queries: dict[str, torch.Tensor],
                       texts: list[str], query_texts: list[str], cfg: DictConfig) -> Attribution:
    """Every method's (Q, N) scores at the model's weights (float64); cfg: the lds config's `methods` group."""
    model = model.double().eval()
    task = CausalLMTask()
    layers = track_layers(model, list(cfg.module_patterns))
    batches = iterate_batches(data, cfg.batch_size)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    q_layers = query_gradients(model, layers, task, iterate_batches(queries, 16), progress=False)
    q_flat = flatten_layers(layers, q_layers).double()  # (Q, P)
    r_flat = parameter_gradients(model, layers, task, batches).double()  # (N, P)
    seconds["gradients"] = time.perf_counter() - start
    factors, fit_seconds = fit_strategies(model, layers, task, batches, cfg.fisher, cfg.seed)
    damping_by_layer = layer_damping(factors["ekfac"], layers, cfg.damping_factor)
    scores: dict[str, np.ndarray] = {}
    for strategy in FACTOR_STRATEGIES:
        start = time.perf_counter()
        preconditioned = flatten_layers(layers, precondition(factors[strategy], q_layers, damping_by_layer)).double()
        scores[strategy] = (preconditioned @ r_flat.T).numpy()
        seconds[strategy] = fit_seconds[strategy] + time.perf_counter() - start
    wanted = set(cfg.names)
    if "lissa" in wanted:
        start = time.perf_counter()
        damping = layer_damping_vector(layers, damping_by_layer)
        lissa, lissa_args = run_lissa(model, layers, task, data, q_flat, damping, cfg.lissa.depth_multiple, cfg.lissa,
                                      cfg.seed)
        scores["lissa"] = (lissa.ihvp.double() @ r_flat.T).numpy()
        seconds["lissa"] = time.perf_counter() - start
        lissa_info = {"scale": lissa.scale, "depth": lissa_args.depth}
    else:
        lissa_info = {}
    if "trackstar" in wanted:
        start = time.perf_counter()
        root = factor_operator(factors["ekfac"], layers, damping_by_layer, power=0.5)
        pq, pr = root(q_flat), root(r_flat)
        pq, pr = pq / pq.norm(dim=1, keepdim=True), pr / pr.norm(dim=1, keepdim=True).clamp_min(1e-300)
        scores["trackstar"] = (pq @ pr.T).numpy()
        seconds["trackstar"] = fit_seconds["ekfac"] + time.perf_counter() - start
    if "trak" in wanted:
        start = time.perf_counter()
        scores["trak"] = trak_scores(q_flat, r_flat, int(cfg.trak.dimension), cfg.damping_factor, cfg.seed)
        seconds["trak"] = time.perf_counter() - start
    if "bm25" in wanted:
        start = time.perf_counter()
        scores["bm25"] = BM25Index.build(texts).scores(query_texts)
        seconds["bm25"] = time.perf_counter() - start
    return Attribution(scores, seconds, damping_by_layer, [l.name for l in layers], int(r_flat.shape[1]), lissa_info)
