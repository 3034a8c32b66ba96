"""LiSSA (Agarwal et al. 2017): the iterative, stochastic inverse-Hessian-vector product baseline (paper Sec 5.1).

    v_0 = q,    v_{j+1} = q + (I - (G_{B_j} + lambda I) / scale) v_j,    (G + lambda I)^{-1} q  ~  v_depth / scale

with G_{B_j} the exact Gauss-Newton Hessian (same normalisation as `baselines.exact_gauss_newton`) of a random
mini-batch B_j, via `gnh.gnh_vector_product`. The recursion is a Neumann series for (A/scale)^{-1}; it
converges if scale exceeds the largest eigenvalue of G_B + lambda I, at a rate (1 - lambda_min/scale)^depth.
The paper sets depth = the number of data points. Repeats with different mini-batch draws are averaged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..batch import check_finite
from ..task import Task
from ..tracking import TrackedLayer
from .gnh import check_vector_size, gnh_vector_product, num_tracked_parameters, top_eigenvalue


@dataclass
class LissaArguments:
    """LiSSA hyperparameters. `scale=None`: scale_factor x the largest eigenvalue of G_B + lambda over
    `scale_batches` random mini-batches (power iteration): the recursion needs scale above every mini-batch's
    curvature, which exceeds the full-batch one."""

    depth: int = 1000  # recursion steps (paper: number of data points)
    scale: float | None = None
    scale_factor: float = 1.5
    scale_batches: int = 10
    batch_size: int = 8  # sequences per stochastic GNH-vector product
    repeats: int = 1  # independent recursions, averaged
    seed: int = 0
    snapshots: Sequence[int] = ()  # also return the estimate after these depths (for accuracy-vs-time curves)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.depth < 1 or self.batch_size < 1 or self.repeats < 1:
            raise ValueError(f"depth, batch_size and repeats must be >= 1, got {self.depth}, {self.batch_size}, "
                             f"{self.repeats}")
        if self.scale is not None and self.scale <= 0:
            raise ValueError(f"scale must be positive, got {self.scale}")
        bad = [s for s in self.snapshots if not 1 <= s <= self.depth]
        if bad:
            raise ValueError(f"snapshots {bad} are outside 1..depth={self.depth}")


@dataclass
class LissaResult:
    ihvp: torch.Tensor  # (K, P) estimate of (G + lambda I)^{-1} q
    scale: float
    seconds: float
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)  # depth -> (K, P)
    snapshot_seconds: dict[int, float] = field(default_factory=dict)  # depth -> wall time to reach it


def _num_rows(data: Mapping[str, torch.Tensor]) -> int:
    sizes = {k: len(v) for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not sizes or len(set(sizes.values())) != 1:
        raise ValueError(f"data must be a dict of tensors with the same number of rows, got sizes {sizes}")
    return next(iter(sizes.values()))


def lissa_ihvp(model: nn.Module, layers: Sequence[TrackedLayer], task: Task, data: Mapping[str, torch.Tensor],
               vectors: torch.Tensor, damping: float | torch.Tensor, args: LissaArguments | None = None) -> LissaResult:
    """LiSSA estimate of (G + damping I)^{-1} v for each row of `vectors` (K, P), canonical flat layout.

    data: the curvature data as one dict of row-aligned tensors (N, ...), e.g. input_ids / attention_mask /
    labels; mini-batches of `args.batch_size` rows are drawn from it at random. damping: scalar or (P,).
    Raises FloatingPointError if the recursion diverges (scale too small).
    """
    args = args or LissaArguments()
    check_vector_size(layers, vectors)
    num_rows = _num_rows(data)
    if args.batch_size > num_rows:
        raise ValueError(f"batch_size={args.batch_size} exceeds the {num_rows} data points")
    q = vectors.double()
    damping = torch.as_tensor(damping, dtype=torch.float64)
    start = time.perf_counter()
    scale = args.scale
    generator = torch.Generator().manual_seed(args.seed)
    if scale is None:
        tops = []
        for _ in range(args.scale_batches):
            rows = torch.randperm(num_rows, generator=generator)[: args.batch_size]
            batch = [{k: t[rows] for k, t in data.items()}]
            tops.append(top_eigenvalue(lambda v: gnh_vector_product(model, layers, task, batch, v),
                                       num_tracked_parameters(layers), iterations=15))
        scale = args.scale_factor * (max(tops) + float(damping.max()))
    total = torch.zeros_like(q)
    snapshot_sums = {d: torch.zeros_like(q) for d in args.snapshots}
    snapshot_seconds: dict[int, float] = {}
    bar = tqdm(total=args.depth * args.repeats, desc="LiSSA", disable=not args.progress, leave=False)
    for _ in range(args.repeats):
        v = q.clone()
        for step in range(1, args.depth + 1):
            rows = torch.randperm(num_rows, generator=generator)[: args.batch_size]
            batch = {k: t[rows] for k, t in data.items()}
            product = gnh_vector_product(model, layers, task, [batch], v).double() + damping * v
            v = q + v - product / scale
            if step % 50 == 0 or step == args.depth:
                check_finite(v, "LiSSA iterate")
                # with scale above every mini-batch curvature, ||I - A_B / scale|| <= 1, so ||v_j|| <= (j + 1) ||q||
                if float(v.norm()) > 2 * (step + 1) * float(q.norm()):
                    raise FloatingPointError(f"LiSSA diverged at step {step} with scale={scale:.3g}; "
                                             "raise scale (or scale_factor)")
            if step in snapshot_sums:
                snapshot_sums[step] += v / scale
                snapshot_seconds[step] = time.perf_counter() - start  # of the last repeat; repeats are sequential
            bar.update(1)
        total += v / scale
    bar.close()
    seconds = time.perf_counter() - start
    return LissaResult((total / args.repeats).to(vectors.dtype), scale, seconds,
                       {d: (s / args.repeats).to(vectors.dtype) for d, s in snapshot_sums.items()}, snapshot_seconds)
