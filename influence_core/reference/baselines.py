"""Ground truth and reference estimators that do not use Kronecker factors.

- `parameter_gradients`: per-example gradients from ordinary autograd on the parameters (brute force),
  flattened over the tracked layers in canonical layout, (N, P) with P = sum_l d_out_l (d_in_l + 1).
- `exact_gauss_newton`: the dense Gauss-Newton Hessian of the tracked parameters,
      G = (1/N) sum_n sum_t J_{n,t}^T (diag p - p p^T) J_{n,t},     (P, P)
  with J_{n,t} the Jacobian of the logits at position t of sequence n; for softmax cross-entropy this is the
  (expected) Fisher. Built with H = R R^T, R[:, c] = sqrt(p_c)(e_c - p): one backward pass per
  (position, class), so only for tiny models.
- `exact_ihvp`: (G + lambda I)^{-1} V by a dense solve.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from ..batch import Batch, eval_mode, row_count, single_rows, to_device, token_weights
from ..task import IGNORE_INDEX, Task
from ..tracking import (LayerCapture, TrackedLayer, per_sequence_gradients, tracked_parameters,
                        tracked_parameters_require_grad)


def flatten_parameter_tensors(layers: Sequence[TrackedLayer], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Tensors shaped like `tracked_parameters(layers)` (leading batch dims allowed) -> canonical flat (..., P)."""
    out, i = [], 0
    for layer in layers:
        if layer.members:  # an input-sharing block: (weight, bias) of each member in turn
            step = 1 + int(layer.has_bias)
            own = grads[i : i + step * len(layer.members)]
            i += len(own)
            canonical = layer.canonical_gradient(own[::step], own[1::step] if layer.has_bias else None)
            out.append(canonical.reshape(*canonical.shape[:-2], -1))
            continue
        weight_grad = grads[i]
        bias_grad = grads[i + 1] if layer.has_bias else None
        i += 1 + int(layer.has_bias)
        canonical = layer.canonical_gradient(weight_grad, bias_grad)
        out.append(canonical.reshape(*canonical.shape[:-2], -1))
    return torch.cat(out, dim=-1)


def flatten_layers(layers: Sequence[TrackedLayer], per_layer: dict[str, torch.Tensor]) -> torch.Tensor:
    """{layer: (..., d_out, d_in)} -> (..., P) in the order of `layers`."""
    return torch.cat([per_layer[l.name].reshape(*per_layer[l.name].shape[:-2], -1) for l in layers], dim=-1)


def unflatten_layers(layers: Sequence[TrackedLayer], flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """(..., P) -> {layer: (..., d_out, d_in)}; inverse of flatten_layers."""
    out, start = {}, 0
    for l in layers:
        size = l.out_features * l.input_dim
        out[l.name] = flat[..., start : start + size].reshape(*flat.shape[:-1], l.out_features, l.input_dim)
        start += size
    return out


def parameter_gradients(model: nn.Module, layers: Sequence[TrackedLayer], task: Task, batches: Iterable[Batch],
                        loss: str = "training") -> torch.Tensor:
    """Brute-force per-example gradient of the training (or query) loss, one example at a time, (N, P)."""
    params = tracked_parameters(layers)
    rows = []
    with eval_mode(model), tracked_parameters_require_grad(layers):
        for example in single_rows(batches):
            example = to_device(example, model)
            value = task.training_loss(model, example) if loss == "training" else task.query_loss(model, example)
            rows.append(flatten_parameter_tensors(layers, torch.autograd.grad(value, params)).detach())
    return torch.stack(rows)


def exact_gauss_newton(model: nn.Module, layers: Sequence[TrackedLayer], task: Task,
                       batches: Iterable[Batch]) -> torch.Tensor:
    """The dense Gauss-Newton Hessian (= Fisher for softmax cross-entropy) of the tracked parameters, (P, P).

    One backward pass per (position, class) for a whole batch; per-example parameter gradients come from the
    captured activations and output gradients (D_n = sum_t g_t a_t^T), which `parameter_gradients` checks
    against plain autograd.
    """
    size = sum(l.num_parameters for l in layers)
    gnh = torch.zeros(size, size, dtype=torch.float64)
    num_examples = 0
    with eval_mode(model), tracked_parameters_require_grad(layers), LayerCapture(layers) as capture:
        for batch in batches:
            batch = to_device(batch, model)
            capture.clear(batch)
            logits, labels = task.forward(model, batch)  # (B, T, C)
            valid = labels != IGNORE_INDEX
            p = torch.softmax(logits.detach().double(), dim=-1) * valid.unsqueeze(-1)
            sqrt_p = p.sqrt()
            activations = {l.name: capture.activations[l.name] * token_weights(task, batch, capture.activations[l.name])
                           for l in layers}
            num_positions, num_classes = logits.shape[1], logits.shape[2]
            for t in range(num_positions):
                if not bool(valid[:, t].any()):
                    continue
                for c in range(num_classes):
                    r = torch.zeros_like(p)
                    r[:, t] = -p[:, t] * sqrt_p[:, t, c : c + 1]  # R_t[:, c] = sqrt(p_c) (e_c - p)
                    r[:, t, c] += sqrt_p[:, t, c]
                    loss = (logits * r.to(logits.dtype)).sum()
                    grads = capture.output_gradients(loss, retain_graph=True)
                    v = flatten_layers(layers, {l.name: per_sequence_gradients(activations[l.name], grads[l.name])
                                                for l in layers}).double()  # (B, P)
                    gnh.addmm_(v.T, v)  # in place: a fresh (P, P) temporary per step is slow
            num_examples += row_count(batch)
    if num_examples == 0:
        raise ValueError("no examples to form the Gauss-Newton Hessian from")
    return gnh / num_examples


def exact_ihvp(gnh: torch.Tensor, vectors: torch.Tensor, damping: float | torch.Tensor) -> torch.Tensor:
    """(G + damping I)^{-1} v for each row of vectors (K, P); damping a scalar or a (P,) vector."""
    eye = torch.eye(gnh.shape[0], dtype=gnh.dtype)
    damping = torch.as_tensor(damping, dtype=gnh.dtype)
    system = gnh + (torch.diag(damping) if damping.dim() == 1 else damping * eye)
    return torch.linalg.solve(system, vectors.to(gnh.dtype).T).T
