"""Diagnostics on dense models: where the layer-wise estimators lose accuracy against the exact influence."""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

from influence_core import FactorArguments, fit_factors, iterate_batches
from influence_core.reference.baselines import exact_ihvp, parameter_gradients
from influence_core.reference.gnh import layer_damping_vector

from .estimators import factor_operator
from .ground_truth import layerwise
from .metrics import correlations
from .setups import ValidationSetup

def dense_diagnostics(setup: ValidationSetup, layers, gnh: torch.Tensor, q_flat: torch.Tensor, ekfac, layer_damping,
                      cfg: DictConfig) -> list[dict]:
    """Pearson with the exact influence of: EK-FAC fitted on fewer examples, or with the sampled Fisher (one label
    drawn per example) instead of the expected one; and of EK-FAC / exact_layerwise / identity on a subset of the
    tracked layers, the ground truth then on that subset too (the GNH of a parameter subset is the principal
    submatrix of G). Every variant uses the run's absolute damping per layer."""
    model, task = setup.model, setup.task
    r_flat = parameter_gradients(model, layers, task, iterate_batches(setup.scored, setup.batch_size))  # (M, P)
    damping = layer_damping_vector(layers, layer_damping)
    truth = exact_ihvp(gnh, q_flat, damping) @ r_flat.T
    rows = []
    num_data = len(next(iter(setup.data.values())))
    for count in cfg.diagnostics.fit_examples:
        count = min(int(count), num_data)
        subset = iterate_batches({k: v[:count] for k, v in setup.data.items()}, setup.batch_size)
        for fisher in ("expected", "sampled") if setup.fisher == "expected" else ("sampled",):
            fitted = fit_factors(model, layers, task, subset, FactorArguments(strategy="ekfac", fisher=fisher,
                                                                             dtype="float64", seed=cfg.seed, progress=False))
            estimate = factor_operator(fitted, layers, layer_damping)(q_flat) @ r_flat.T  # same absolute damping
            rows.append({"model": setup.name, "diagnostic": "fitting examples", "setting": f"{fisher} Fisher, {count}",
                         "fisher": fisher, "fit_examples": count, "estimator": "ekfac", **correlations(estimate, truth)})
    starts = np.cumsum([0] + [l.num_parameters for l in layers])
    last = layers[-1].name
    subsets = [("all layers", [l.name for l in layers])]
    if len(layers) > 1:
        subsets += [(f"all but the last ({last})", [l.name for l in layers[:-1]]), (f"the last only ({last})", [last])]
    for subset_name, names in subsets:
        chosen = [i for i, l in enumerate(layers) if l.name in names]
        index = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in chosen])
        sub_layers = [layers[i] for i in chosen]
        q, r, d = q_flat[:, index], r_flat[:, index], damping[index]
        sub_truth = exact_ihvp(gnh[index][:, index], q, d) @ r.T
        for estimator, value in [("ekfac", factor_operator(ekfac, sub_layers, layer_damping)(q) @ r.T),
                                 ("exact_layerwise", exact_ihvp(layerwise(gnh[index][:, index], sub_layers), q, d) @ r.T),
                                 ("identity", q @ r.T)]:
            rows.append({"model": setup.name, "diagnostic": "tracked layers", "setting": subset_name,
                         "estimator": estimator, **correlations(value, sub_truth)})
    return rows


def eigenbasis_check(name: str, layers, gnh: torch.Tensor, ekfac, fisher: str) -> list[dict]:
    """Per layer, the exact block G_l in EK-FAC's Kronecker eigenbasis Q = Q_S (x) Q_A: R = Q^T G_l Q.

    The eigenvalue correction Lambda is diag(R) by construction (paper Eq 20; exactly so with the expected Fisher on
    the same data), so `correction_error` = max |diag(R) - Lambda| / max Lambda checks factors against the dense G
    (normalisation, sampling, precision). `offdiagonal` = ||R - diag(R)||_F / ||R||_F is what EK-FAC throws away
    within the layer: 0 when the Kronecker eigenbasis diagonalises G_l.
    """
    rows, start = [], 0
    for layer in layers:
        end = start + layer.num_parameters
        lf = ekfac.layers[layer.name]
        basis = torch.kron(lf.gradient_eigenvectors.double(), lf.activation_eigenvectors.double())  # columns: (o, i)
        rotated = basis.T @ gnh[start:end, start:end] @ basis
        diagonal = torch.diagonal(rotated)
        eigenvalues = lf.eigenvalues.double().flatten()
        rows.append({"model": name, "layer": layer.name, "fisher": fisher, "parameters": layer.num_parameters,
                     "correction_error": float((diagonal - eigenvalues).abs().max() / eigenvalues.abs().max()),
                     "offdiagonal": float((rotated - torch.diag(diagonal)).norm() / rotated.norm())})
        start = end
    return rows

