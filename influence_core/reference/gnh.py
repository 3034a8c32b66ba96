"""Exact Gauss-Newton-vector products and conjugate gradient: the ground truth for models too large for a dense G.

Same normalisation as `baselines.exact_gauss_newton` (sequences averaged, tokens summed within a sequence):

    G v = (1/N) sum_n sum_t J_{n,t}^T H_{n,t} J_{n,t} v,     H = diag(p) - p p^T   (softmax cross-entropy)

with J_{n,t} the Jacobian of the logits at predicted position t w.r.t. the tracked parameters. J v comes from
the double-backward trick (J v = d/du [ (J^T u) . v ]), J^T w from an ordinary backward pass, so G is never
formed. Vectors are in the canonical flat layout of `baselines.flatten_layers`: per layer (d_out, d_in [+1]),
bias in the last column, layers concatenated, shape (P,) or (K, P).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ..batch import Batch, check_finite, eval_mode, row_count, to_device
from ..task import IGNORE_INDEX, Task
from ..tracking import TrackedLayer, refuse_expert_views, tracked_parameters, tracked_parameters_require_grad
from .baselines import flatten_parameter_tensors


def num_tracked_parameters(layers: Sequence[TrackedLayer]) -> int:
    return sum(l.num_parameters for l in layers)


def flat_to_parameters(layers: Sequence[TrackedLayer], flat: torch.Tensor) -> list[torch.Tensor]:
    """Canonical flat (P,) -> tensors shaped like `tracked_parameters(layers)` (inverse of parameters_to_flat)."""
    refuse_expert_views(layers, "the Gauss-Newton-vector product")
    check_vector_size(layers, flat)
    out, start = [], 0
    for layer in layers:
        size = layer.num_parameters
        block = flat[start : start + size].reshape(layer.out_features, layer.input_dim)
        start += size
        for rows in block.split(list(layer.member_out_features), dim=0):  # one piece per member of a block
            weight = rows[:, : layer.in_features]
            out.append(weight.T if layer.transposed_weight else weight)
            if layer.has_bias:
                out.append(rows[:, -1])
    return out


def parameters_to_flat(layers: Sequence[TrackedLayer], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Tensors shaped like `tracked_parameters(layers)` -> canonical flat (P,)."""
    return flatten_parameter_tensors(layers, tensors)


def check_vector_size(layers: Sequence[TrackedLayer], vector: torch.Tensor) -> None:
    expected = num_tracked_parameters(layers)
    if vector.shape[-1] != expected:
        raise ValueError(f"vector has {vector.shape[-1]} entries, but the tracked layers have {expected} parameters; "
                         "use the canonical flat layout of influence_core.reference.baselines.flatten_layers")


def gnh_vector_product(model: nn.Module, layers: Sequence[TrackedLayer], task: Task, batches: Iterable[Batch],
                       vectors: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """G v for each row of `vectors` (K, P) (or one vector (P,)), G averaged over the sequences of `batches`.

    Three passes per batch and vector: forward, double-backward for J v, backward for J^T H J v. Returns the
    same shape and dtype as `vectors`.
    """
    single = vectors.dim() == 1
    vectors = vectors.unsqueeze(0) if single else vectors
    refuse_expert_views(layers, "the Gauss-Newton-vector product")
    check_vector_size(layers, vectors)
    params = tracked_parameters(layers)
    result = torch.zeros(vectors.shape, dtype=torch.float64)
    num_sequences = 0
    # the math attention kernel is twice differentiable; the fused CPU kernels have no double backward
    with eval_mode(model), tracked_parameters_require_grad(layers), sdpa_kernel([SDPBackend.MATH]):
        for batch in tqdm(batches, desc="GNH-vector product", disable=not progress, leave=False):
            batch = to_device(batch, model)
            logits, labels = task.forward(model, batch)  # (B, T, C)
            valid = (labels != IGNORE_INDEX).unsqueeze(-1)
            p = torch.softmax(logits.detach().double(), dim=-1) * valid
            dummy = torch.zeros_like(logits, requires_grad=True)
            transposed = torch.autograd.grad(logits, params, grad_outputs=dummy, create_graph=True)  # J^T u
            for k in range(vectors.shape[0]):
                v = [t.to(logits.device, logits.dtype) for t in flat_to_parameters(layers, vectors[k])]
                dot = sum((jt * vt).sum() for jt, vt in zip(transposed, v))
                jv = torch.autograd.grad(dot, dummy, retain_graph=True)[0].double()  # J v, (B, T, C)
                hjv = p * jv - p * (p * jv).sum(dim=-1, keepdim=True)  # (diag p - p p^T) J v
                grads = torch.autograd.grad(logits, params, grad_outputs=hjv.to(logits.dtype),
                                            retain_graph=True)
                result[k] += parameters_to_flat(layers, grads).double().cpu()
            num_sequences += row_count(batch)
    if num_sequences == 0:
        raise ValueError("no batches to form the Gauss-Newton-vector product over")
    result = (result / num_sequences).to(vectors.dtype)
    check_finite(result, "Gauss-Newton-vector product")
    return result[0] if single else result


def layer_damping_vector(layers: Sequence[TrackedLayer], damping: Mapping[str, float] | float,
                         dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per-layer damping {layer: lambda_l} (or one scalar) -> (P,) vector in the canonical flat layout."""
    if isinstance(damping, (int, float)):
        return torch.full((num_tracked_parameters(layers),), float(damping), dtype=dtype)
    missing = [l.name for l in layers if l.name not in damping]
    if missing:
        raise ValueError(f"no damping given for layers {missing}")
    return torch.cat([torch.full((l.num_parameters,), float(damping[l.name]), dtype=dtype) for l in layers])


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor,
                       damping: float | torch.Tensor, tolerance: float = 1e-8, max_iterations: int = 500,
                       progress: bool = False,
                       preconditioner: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """Solve (G + damping) x = rhs for each row of rhs (K, P) by (preconditioned) conjugate gradient, in lock-step.

    `matvec` maps (K, P) -> G (K, P); damping a scalar or (P,). `preconditioner` (K, P) -> (K, P), symmetric
    positive definite, approximates (G + damping)^{-1} (e.g. the EK-FAC inverse): it changes how fast CG gets
    there, not where (the iterates still solve the exact system). Stops when every row's relative residual
    ||rhs - (G + damping) x|| / ||rhs|| is below `tolerance`. Returns (x, info): iterations, relative residuals.
    """
    if tolerance <= 0 or max_iterations < 1:
        raise ValueError(f"tolerance must be > 0 and max_iterations >= 1, got {tolerance} and {max_iterations}")
    single = rhs.dim() == 1
    b = (rhs.unsqueeze(0) if single else rhs).double()
    damping = torch.as_tensor(damping, dtype=torch.float64)
    precondition = (lambda v: preconditioner(v).double()) if preconditioner is not None else (lambda v: v)

    def apply(v: torch.Tensor) -> torch.Tensor:
        return matvec(v).double() + damping * v

    x = torch.zeros_like(b)
    r = b.clone()
    z = precondition(r)
    d = z.clone()
    rz = (r * z).sum(dim=1)
    b_norm = b.norm(dim=1).clamp_min(1e-300)
    residual = r.norm(dim=1) / b_norm
    iterations = 0
    bar = tqdm(total=max_iterations, desc="conjugate gradient", disable=not progress, leave=False)
    while iterations < max_iterations and bool((residual > tolerance).any()):
        ad = apply(d)
        alpha = rz / (d * ad).sum(dim=1).clamp_min(1e-300)
        alpha = torch.where(residual > tolerance, alpha, torch.zeros_like(alpha))  # freeze converged rows
        x = x + alpha[:, None] * d
        r = r - alpha[:, None] * ad
        z = precondition(r)
        rz_new = (r * z).sum(dim=1)
        d = z + (rz_new / rz.clamp_min(1e-300))[:, None] * d
        rz = rz_new
        residual = r.norm(dim=1) / b_norm
        iterations += 1
        bar.update(1)
        bar.set_postfix(residual=f"{float(residual.max()):.1e}")
    bar.close()
    info = {"iterations": iterations, "relative_residual": residual.tolist(),
            "preconditioned": preconditioner is not None}
    return (x[0] if single else x).to(rhs.dtype), info


def top_eigenvalue(matvec: Callable[[torch.Tensor], torch.Tensor], size: int, iterations: int = 20,
                   seed: int = 0) -> float:
    """Largest eigenvalue of a symmetric PSD operator (K, P) -> (K, P) by power iteration."""
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(1, size, generator=generator, dtype=torch.float64)
    v = v / v.norm()
    value = 0.0
    for _ in range(iterations):
        w = matvec(v).double()
        value = float((w * v).sum())
        v = w / w.norm().clamp_min(1e-300)
    return value
