"""Ground truth and reference estimators that do not use Kronecker factors.

- `parameter_gradients`: per-example gradients from ordinary autograd on the parameters (brute force),
  flattened over the tracked layers in canonical layout, (N, P) with P = sum_l d_out_l (d_in_l + 1).
- `exact_gauss_newton`: the dense Gauss-Newton Hessian of the tracked parameters,
      G = (1/N) sum_n sum_t J_{n,t}^T (diag p - p p^T) J_{n,t},     (P, P)
  with J_{n,t} the Jacobian of the logits at position t of sequence n; for softmax cross-entropy this is the
  (expected) Fisher. Built with H = R R^T, R[:, c] = sqrt(p_c)(e_c - p): one backward pass per
  (position, class), so only for tiny models.
- `position_local_gauss_newton`: the same G, exactly, for layers whose output at a position reaches the logits at
  that position only (the last block's MLP of a transformer): one double-backward pass per output unit instead of
  one backward pass per (position, class), so a layer of a language model with a large vocabulary.
- `exact_ihvp`: (G + lambda I)^{-1} V by a dense solve.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..batch import Batch, eval_mode, row_count, single_rows, to_device, token_weights
from ..task import IGNORE_INDEX, Task
from ..tracking import (LayerCapture, TrackedLayer, per_sequence_gradients, refuse_expert_views, tracked_parameters,
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


def position_local_gauss_newton(model: nn.Module, layers: Sequence[TrackedLayer], task: Task,
                                batches: Iterable[Batch], seed: int = 0) -> torch.Tensor:
    """The dense Gauss-Newton Hessian of `exact_gauss_newton` (same G, same normalisation), (P, P), for tracked layers
    whose output at input position t reaches only the logits at predicted position t (nothing that mixes positions
    runs after them: the last block's MLP, the attention's output projection of the last block). Then

        J_t = B_t (x) a_t^T,   B_t = d logits_t / d s_t  (C, D),   s_t = the tracked layers' outputs at t, stacked (D,)
        G = (1/N) sum_n sum_t  (B_t^T H_t B_t) (x) a_t a_t^T,     H_t = diag(p_t) - p_t p_t^T

    with a_t the layers' inputs [1] (the block of layers l, l' pairs rows of B_t for l with those for l'). Column i of
    B_t, at every t at once, is one double-backward pass (tangent e_i on s at every position: position-local, so each
    logit sees its own position's only): D passes per batch instead of one per (position, class). A random tangent
    checks that assumption on every batch: if a tracked layer reaches another position's logits (attention runs after
    it), ValueError names the layers. Exact in exact arithmetic, not sampled.
    """
    refuse_expert_views(layers, "the position-local Gauss-Newton Hessian")
    unsupported = [l.name for l in layers if l.members or l.one_hot]
    if unsupported:
        raise ValueError(f"the position-local Gauss-Newton Hessian takes plain linear layers; {unsupported} are "
                         "input-sharing blocks or embeddings: track their modules one by one, or use exact_gauss_newton")
    widths = [l.out_features for l in layers]
    offsets = [sum(widths[:i]) for i in range(len(layers) + 1)]  # rows of B_t^T per layer
    pairs = [(l, m) for l in range(len(layers)) for m in range(l, len(layers))]
    # block (l, m) of G, accumulated as (d_l d_m, i_l i_m) and rearranged to (d_l i_l, d_m i_m) once at the end
    sums = {(l, m): torch.zeros(widths[l] * widths[m], layers[l].input_dim * layers[m].input_dim, dtype=torch.float64)
            for l, m in pairs}
    generator = torch.Generator().manual_seed(seed)
    num_examples = 0
    # the math attention kernel is twice differentiable; the fused CPU kernels have no double backward
    with eval_mode(model), tracked_parameters_require_grad(layers), LayerCapture(layers) as capture, \
            sdpa_kernel([SDPBackend.MATH]):
        for batch in batches:
            batch = to_device(batch, model)
            capture.clear(batch)
            logits, labels = task.forward(model, batch)  # (B, T, C)
            rows, positions = labels.shape
            activations = [capture.activations[l.name] * token_weights(task, batch, capture.activations[l.name])
                           for l in layers]  # (B, T_in, d_in + 1)
            if activations[0].shape[1] < positions:
                raise ValueError(f"{positions} predicted positions but {activations[0].shape[1]} input positions: the "
                                 "task's logits at position t must come from input position t")
            dummy = torch.zeros_like(logits, requires_grad=True)
            outputs = [capture.outputs[l.name] for l in layers]
            transposed = torch.autograd.grad(logits, outputs, grad_outputs=dummy, create_graph=True)  # B^T u per layer
            transposed = [jt.reshape(rows, a.shape[1], -1) for jt, a in zip(transposed, activations)]  # (B, T_in, d_l)
            valid = (labels != IGNORE_INDEX).reshape(-1).cpu()
            root_p = torch.softmax(logits.detach().double(), dim=-1).reshape(-1, logits.shape[-1])[valid].sqrt().cpu()
            # R_t = B_t^T diag(sqrt p_t) at the n predicted tokens, (n, D, C): then B_t^T H_t B_t = R R^T - r r^T
            scaled = torch.empty(len(root_p), offsets[-1], logits.shape[-1], dtype=torch.float64)
            probe = torch.cat([torch.randn(jt.shape, generator=generator, dtype=torch.float64) for jt in transposed],
                              -1)[:, :positions].reshape(-1, offsets[-1])  # a random tangent, for the check below
            local = torch.zeros(rows * positions, logits.shape[-1], dtype=torch.float64)  # its position-local image
            for l, jt in enumerate(transposed):
                for i in range(jt.shape[-1]):
                    column = torch.autograd.grad(jt[..., i].sum(), dummy, retain_graph=True)[0].double().cpu()
                    column = column.reshape(-1, logits.shape[-1])  # d logits_t / d s_{t, i}, (B T, C)
                    local.addcmul_(column, probe[:, offsets[l] + i : offsets[l] + i + 1])
                    scaled[:, offsets[l] + i] = column[valid] * root_p
            tangent = [v.reshape(rows, positions, -1) for v in probe.split(widths, dim=-1)]
            dot = sum((jt[:, :positions] * v.to(jt)).sum() for jt, v in zip(transposed, tangent))
            full = torch.autograd.grad(dot, dummy)[0].double().cpu().reshape(-1, logits.shape[-1])
            mismatch = float((full - local).norm() / full.norm().clamp_min(1e-300))
            if mismatch > (1e-8 if logits.dtype == torch.float64 else 1e-3):
                raise ValueError(f"tracked layers {[l.name for l in layers]} reach the logits of other positions (a "
                                 f"random tangent differs by {mismatch:.1e} from its position-local image): attention "
                                 "runs after them; track layers of the last block only, or use exact_gauss_newton")
            projected = torch.bmm(scaled, root_p[:, :, None])  # B^T p, (n, D, 1)
            curvature = torch.bmm(scaled, scaled.transpose(1, 2)) - projected * projected.transpose(1, 2)  # (n, D, D)
            inputs = [a[:, :positions].double().cpu().reshape(-1, a.shape[-1])[valid] for a in activations]  # (n, i_l)
            for l, m in pairs:
                s = curvature[:, offsets[l]:offsets[l + 1], offsets[m]:offsets[m + 1]].reshape(len(curvature), -1)
                sums[l, m].addmm_(s.T, (inputs[l][:, :, None] * inputs[m][:, None, :]).reshape(len(s), -1))
            num_examples += row_count(batch)
    if num_examples == 0:
        raise ValueError("no examples to form the Gauss-Newton Hessian from")
    starts = [sum(l.num_parameters for l in layers[:i]) for i in range(len(layers) + 1)]  # blocks of G per layer
    gnh = torch.empty(starts[-1], starts[-1], dtype=torch.float64)
    for l, m in pairs:  # [(i, k), (j, n)] -> [(i, j), (k, n)]: output unit, then input unit (the canonical layout)
        block = sums.pop((l, m)).reshape(widths[l], widths[m], layers[l].input_dim, layers[m].input_dim)
        gnh[starts[l]:starts[l + 1], starts[m]:starts[m + 1]] = block.permute(0, 2, 1, 3).reshape(
            layers[l].num_parameters, layers[m].num_parameters)
        if m != l:
            gnh[starts[m]:starts[m + 1], starts[l]:starts[l + 1]] = gnh[starts[l]:starts[l + 1], starts[m]:starts[m + 1]].T
    return gnh / num_examples


def exact_ihvp(gnh: torch.Tensor, vectors: torch.Tensor, damping: float | torch.Tensor) -> torch.Tensor:
    """(G + damping I)^{-1} v for each row of vectors (K, P); damping a scalar or a (P,) vector."""
    eye = torch.eye(gnh.shape[0], dtype=gnh.dtype)
    damping = torch.as_tensor(damping, dtype=gnh.dtype)
    system = gnh + (torch.diag(damping) if damping.dim() == 1 else damping * eye)
    return torch.linalg.solve(system, vectors.to(gnh.dtype).T).T
