"""Ground truths for the estimators (small models).

1. exact: (G + lambda)^{-1} q with G the dense Gauss-Newton Hessian of all tracked layers, cross-layer blocks
   included, or conjugate gradient on exact GNH-vector products, preconditioned by EK-FAC (which speeds CG up without
   changing what it converges to); `layerwise(G)` drops the cross-layer blocks: the best any layer-wise method can do.
   A dense G is formed one of two exact ways (GAUSS_NEWTON): `per_class`, one backward pass per (position, class),
   for small output spaces; `position_local`, one double backward per output unit, for last-block layers of a
   language model (its vocabulary is too large for the first). A dense solve reports its residual and the condition
   number of G + lambda (`dense_solve_info`), a CG solve its iterations and residuals.
2. PBRF (paper Eq 7) at a small epsilon, optimised from the trained weights for each training point (L-BFGS,
   preconditioned by (G + lambda)^{-1/2} when G is dense, else by EK-FAC); every solve reports its final gradient, and
   points whose solves did not converge are left out of the PBRF correlations. `pbrf_one_copy`: epsilon = 1/N.
"""

from __future__ import annotations

from typing import Callable

import torch
from omegaconf import DictConfig

from influence_core import iterate_batches
from influence_core.reference.baselines import exact_gauss_newton, exact_ihvp, position_local_gauss_newton
from influence_core.reference.gnh import conjugate_gradient, gnh_vector_product
from influence_core.reference.pbrf import PBRFArguments, pbrf_influence

from .estimators import timed


GAUSS_NEWTON: dict[str, Callable] = {"per_class": exact_gauss_newton, "position_local": position_local_gauss_newton}


def damped_system(gnh: torch.Tensor, damping: torch.Tensor) -> torch.Tensor:
    """G + lambda for a dense G (P, P) and a damping per parameter (P,) or one scalar."""
    return gnh + torch.diag(torch.as_tensor(damping, dtype=gnh.dtype).expand(gnh.shape[0]))


def relative_residual(system: torch.Tensor, solution: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """||A x - q|| / ||q|| per row, for rows x (Q, P) and q (Q, P) of a symmetric A (P, P)."""
    rhs = rhs.to(system.dtype)
    return (solution.to(system.dtype) @ system - rhs).norm(dim=1) / rhs.norm(dim=1).clamp_min(1e-300)


def dense_solve_info(gnh: torch.Tensor, damping: torch.Tensor, rhs: torch.Tensor, solution: torch.Tensor,
                     eigenvalues: torch.Tensor | None = None) -> dict:
    """How exact a dense solve of (G + lambda) x = q is: relative residual ||(G + lambda) x - q|| / ||q|| per row,
    and the extreme eigenvalues and condition number of G + lambda (float64 loses ~ condition x 1e-16 of x).
    eigenvalues: those of G + lambda, ascending, when the caller has them (else computed here by eigvalsh)."""
    system = damped_system(gnh, damping)
    residual = relative_residual(system, solution, rhs)
    eigenvalues = torch.linalg.eigvalsh(system) if eigenvalues is None else eigenvalues
    return {"relative_residual": residual.tolist(), "eigenvalue_min": float(eigenvalues[0]),
            "eigenvalue_max": float(eigenvalues[-1]), "condition_number": float(eigenvalues[-1] / eigenvalues[0])}


def layerwise(gnh: torch.Tensor, layers) -> torch.Tensor:
    """G with the cross-layer blocks set to zero (what every layer-wise approximation assumes)."""
    out = torch.zeros_like(gnh)
    start = 0
    for layer in layers:
        end = start + layer.num_parameters
        out[start:end, start:end] = gnh[start:end, start:end]
        start = end
    return out


def exact_solution(model, layers, task, batches, q_flat, damping, cfg: DictConfig, method: str, gnh=None,
                   preconditioner: Callable | None = None, tolerance: float | None = None,
                   max_iterations: int | None = None, gauss_newton: str = "per_class") -> dict:
    """(G + lambda)^{-1} q by a dense solve (forming G once, the GAUSS_NEWTON way named) or by preconditioned CG on
    GNH-vector products."""
    tolerance = tolerance or cfg.exact.cg_tolerance
    max_iterations = max_iterations or cfg.exact.cg_max_iterations
    if method == "dense":
        if gnh is not None:
            return {"ihvp": exact_ihvp(gnh, q_flat, damping), "gnh": gnh, "gnh_seconds": 0.0}
        if gauss_newton not in GAUSS_NEWTON:
            raise ValueError(f"unknown gauss_newton '{gauss_newton}'; choose one of {list(GAUSS_NEWTON)}")
        gnh, seconds = timed(lambda: GAUSS_NEWTON[gauss_newton](model, layers, task, batches))
        return {"ihvp": exact_ihvp(gnh, q_flat, damping), "gnh": gnh, "gnh_seconds": seconds}
    ihvp, info = conjugate_gradient(lambda v: gnh_vector_product(model, layers, task, batches, v), q_flat, damping,
                                    tolerance=tolerance, max_iterations=max_iterations,
                                    progress=bool(cfg.progress), preconditioner=preconditioner)
    if max(info["relative_residual"]) > tolerance:
        print(f"warning: CG stopped at {info['iterations']} iterations with relative residual "
              f"{max(info['relative_residual']):.1e} > {tolerance}; raise the iteration cap")
    return {"ihvp": ihvp, "info": info}


def single_rows(data: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    size = len(next(iter(data.values())))
    return [{k: v[i : i + 1] for k, v in data.items()} for i in range(size)]


def pbrf_ground_truths(setup, layers, damping: torch.Tensor, exact: dict, exact_influence: torch.Tensor,
                       epsilons: dict[str, float], preconditioner: Callable, preconditioner_seconds: float,
                       cfg: DictConfig) -> tuple[dict, dict, dict, list[dict]]:
    """The PBRF influence at each epsilon: ({key: (Q, M)}, {key: seconds}, {key: converged (M,)}, convergence rows)."""
    num_data = len(next(iter(setup.data.values())))
    pbrf_batches = iterate_batches(setup.data, cfg.pbrf.batch_size or num_data)  # full batch per objective evaluation
    # a query's sensitivity to a leftover gradient g: its influence moves by ~ -q^T (G + lambda)^{-1} g; in units of
    # the query's largest |exact influence|, so influence_tolerance is a fraction of the influence scale
    scale = exact_influence.abs().max(dim=1, keepdim=True).values.clamp_min(1e-300)
    error_weights = exact["ihvp"] / scale
    influence, seconds, keep, convergence = {}, {}, {}, []
    for key, epsilon in epsilons.items():
        iterations = cfg.pbrf.max_iterations if key == "pbrf" else cfg.pbrf.one_copy_max_iterations
        args = PBRFArguments(epsilon=epsilon, max_iterations=iterations, gradient_tolerance=cfg.pbrf.gradient_tolerance,
                             influence_tolerance=cfg.pbrf.influence_tolerance, progress=cfg.progress)
        # the error estimate uses the curvature at theta_s: valid in the linear regime (small eps) only
        pbrf = pbrf_influence(setup.model, layers, setup.task, pbrf_batches, single_rows(setup.scored),
                              iterate_batches(setup.queries, 64), damping, args, preconditioner=preconditioner,
                              error_weights=error_weights if key == "pbrf" else None)
        influence[key] = pbrf.influence
        seconds[key] = pbrf.seconds + preconditioner_seconds
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
            "seconds": seconds[key]})
        print(f"{setup.name}: {key} (eps {epsilon:.2g}): {convergence[-1]['solves_converged']}/{pbrf.converged.numel()} "
              f"solves converged, max relative gradient {convergence[-1]['max_relative_gradient']:.1e}, "
              f"max estimated error {convergence[-1]['max_estimated_error']:.1e} of the largest |influence|")
    return influence, seconds, keep, convergence
