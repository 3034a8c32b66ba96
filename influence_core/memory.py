"""Memory planning: the peak memory of fitting and scoring, per tracked layer, from the layers' shapes alone.

For a tracked layer with input width d_in (+1 for the bias column) and output width d_out, with b_f bytes per
factor number (FactorArguments.dtype), b_m bytes per model number, B sequences per batch, T tokens, Q queries:

    factors (kept while scoring)      (d_in^2 + d_out^2 / k + d_in d_out) b_f  eigenvectors Q_A, Q_S, eigenvalues
    covariance pass (running sums)    (d_in^2 + d_out^2 / k) b_f
    eigendecomposition workspace      3 max(d_in^2, d_out^2 / k) x 8           float64 eigh of the larger factor
    eigenvalue correction, per batch  2 B (d_out / k) d_in b_f                 per-sequence gradients and rotation
    scoring, per batch                B (d_out / k) d_in b_f                   per-sequence gradients
    preconditioned queries            Q d_out d_in x 4 (full rank)  or  Q r (d_out + d_in) x 4 (rank r)
    rank-r queries kept dense         Q d_out d_in x 4, summed over layers, at most 1 GiB (ScoreArguments.dense_query_bytes)
    pooled training batches           pool_bytes (ScoreArguments.pool_bytes, default 0: each batch alone)
    captured activations / gradients  B T (d_in + d_out) b_m

plus the model's weights (parameters x b_m) and the activations its backward pass keeps, estimated as
34 B T h n_layers x b_m / 2 (Korthikanti et al. 2022's count for a transformer layer of width h, per 2-byte
number). The layers' transient terms do not add up: layers are processed one after another inside a batch, so
the peak takes the largest layer's transient beside every layer's factors.

k is the number of output blocks (FactorArguments.output_blocks and ScoreArguments.output_blocks; 1 without):
S block-diagonal over k blocks of d_out / k rows, and the correction and scoring one block at a time. When the
plan does not fit a budget, `plan_output_blocks` finds the smallest k (a power of two dividing every tracked
d_out) that makes it fit.

`plan_memory(layers, ...)` returns a MemoryPlan (per-layer table, stage peaks, the largest batch that fits a
budget); `influence-lab plan --model pythia-410m` prints it for a model built from its config on the meta
device (no weights). Estimates, not measurements: they count tensors, not allocator overheads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .scores import ScoreArguments
from .tracking import TrackedLayer

GIB = 2**30


def dtype_bytes(dtype: torch.dtype | str) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class LayerMemory:
    """Bytes per term for one tracked layer (see the module docstring for each formula)."""

    name: str
    d_in: int
    d_out: int
    factors: int
    covariance: int
    eigendecomposition: int
    correction_per_sequence: int
    scoring_per_sequence: int
    queries: int
    captures_per_token: int
    dense_queries: int = 0  # Q d_out d_in x 4: the queries at full rank, or rank-r ones rebuilt dense for scoring


@dataclass
class MemoryPlan:
    layers: list[LayerMemory]
    weights: int
    backward_per_token: int
    tokens: int
    batch_size: int
    stages: dict[str, int] = field(default_factory=dict)  # stage -> peak bytes at batch_size
    budget: int | None = None
    output_blocks: int | None = None

    @property
    def peak(self) -> int:
        return max(self.stages.values())

    def table(self) -> str:
        """A plain-text table: one row per layer (GiB), then the stage peaks."""
        lines = [f"{'layer':<48} {'d_in':>6} {'d_out':>6} {'factors':>9} {'eigh':>8} {'correct/seq':>11} "
                 f"{'queries':>9}"]
        for l in self.layers:
            lines.append(f"{l.name[-48:]:<48} {l.d_in:>6} {l.d_out:>6} {l.factors / GIB:>9.3f} "
                         f"{l.eigendecomposition / GIB:>8.3f} {l.correction_per_sequence / GIB:>11.4f} "
                         f"{l.queries / GIB:>9.3f}")
        lines.append(f"weights {self.weights / GIB:.2f} GiB; {len(self.layers)} tracked layers; "
                     f"factors of all layers {sum(l.factors for l in self.layers) / GIB:.2f} GiB")
        if self.output_blocks is not None:
            lines.append(f"output blocks: {self.output_blocks} (S block-diagonal; correction and scoring per block)")
        lines.append(f"batch of {self.batch_size} x {self.tokens} tokens:")
        lines += [f"  {stage:<26} {value / GIB:8.2f} GiB" for stage, value in self.stages.items()]
        if self.budget is not None:
            lines.append(f"  budget {self.budget / GIB:.2f} GiB: peak {self.peak / GIB:.2f} GiB "
                         f"({'fits' if self.peak <= self.budget else 'does NOT fit'})")
        return "\n".join(lines)


def layer_memory(layer: TrackedLayer, factor_bytes: int, model_bytes: int, queries: int,
                 query_rank: int | None, output_blocks: int | None = None) -> LayerMemory:
    d_in, d_out = layer.input_dim, layer.out_features
    k = output_blocks or 1
    if d_out % k:
        raise ValueError(f"output_blocks={k} does not divide d_out={d_out} of layer '{layer.name}'; choose a divisor "
                         "of every tracked layer's output width")
    block = d_out // k
    query_numbers = queries * (d_out * d_in if query_rank is None else query_rank * (d_out + d_in))
    return LayerMemory(
        layer.name, d_in, d_out,
        factors=(d_in * d_in + k * block * block + d_in * d_out) * factor_bytes,
        covariance=(d_in * d_in + k * block * block) * factor_bytes,
        eigendecomposition=3 * max(d_in * d_in, k * block * block) * 8,
        correction_per_sequence=2 * block * d_in * factor_bytes,
        scoring_per_sequence=block * d_in * factor_bytes,
        queries=query_numbers * 4,
        captures_per_token=(d_in + d_out) * model_bytes,
        dense_queries=queries * d_out * d_in * 4)


def plan_memory(layers: Sequence[TrackedLayer], model: torch.nn.Module, tokens: int, queries: int = 32,
                query_rank: int | None = 32, factor_dtype: str = "float32", batch_size: int | None = None,
                budget: int | None = None, max_batch: int = 4096, output_blocks: int | None = None,
                pool_bytes: int = 0) -> MemoryPlan:
    """Peak bytes of each stage at `batch_size`, or at the largest batch (<= max_batch) whose peak fits `budget`,
    with the layers' S split into `output_blocks` blocks (None: whole) and `pool_bytes` of training batches pooled
    for the dense contraction (ScoreArguments.pool_bytes).

    Raises ValueError naming the largest layer when not even one sequence fits the budget.
    """
    if tokens < 1 or queries < 0:
        raise ValueError(f"tokens={tokens}, queries={queries}: give tokens >= 1 and queries >= 0")
    parameters = list(model.parameters())
    model_bytes = parameters[0].element_size() if parameters else 4
    weights = sum(p.numel() for p in parameters) * model_bytes
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    depth = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    backward_per_token = 34 * hidden * depth * model_bytes // 2
    per_layer = [layer_memory(l, dtype_bytes(factor_dtype), model_bytes, queries, query_rank, output_blocks)
                 for l in layers]
    if not per_layer:
        raise ValueError("no tracked layers to plan for")

    # compute_scores keeps rank-r queries dense too while they fit dense_query_bytes (an upper bound: a layer whose
    # batches are cheaper factored keeps its flattened factors instead), and pools training batches up to pool_bytes
    dense_total = sum(l.dense_queries for l in per_layer)
    copies = 0 if query_rank is None else min(ScoreArguments().dense_query_bytes, dense_total)

    def stages(b: int) -> dict[str, int]:
        captures = b * tokens * sum(l.captures_per_token for l in per_layer)
        forward = weights + b * tokens * backward_per_token + captures
        all_factors = sum(l.factors for l in per_layer)
        return {
            "covariance pass": forward + sum(l.covariance for l in per_layer),
            "eigendecomposition": weights + sum(l.covariance for l in per_layer)
            + max(l.eigendecomposition for l in per_layer),
            "eigenvalue correction": forward + all_factors + max(b * l.correction_per_sequence for l in per_layer),
            "scoring": forward + all_factors + sum(l.queries for l in per_layer) + copies + pool_bytes
            + max(b * l.scoring_per_sequence for l in per_layer),
        }

    if batch_size is None:
        if budget is None:
            raise ValueError("give batch_size or a memory budget")
        fits = [b for b in _powers_of_two(max_batch) if max(stages(b).values()) <= budget]
        if not fits:
            worst = max(per_layer, key=lambda l: l.factors + l.correction_per_sequence)
            raise ValueError(f"one sequence of {tokens} tokens does not fit {budget / GIB:.2f} GiB: peak "
                             f"{max(stages(1).values()) / GIB:.2f} GiB; the largest layer is {worst.name} "
                             f"({worst.d_out} x {worst.d_in}); raise the budget, track fewer layers, use a lower "
                             "query rank, or split that layer into output blocks")
        batch_size = fits[-1]
    return MemoryPlan(per_layer, weights, backward_per_token, tokens, batch_size, stages(batch_size), budget,
                      output_blocks)


def plan_output_blocks(layers: Sequence[TrackedLayer], model: torch.nn.Module, tokens: int, budget: int,
                       **settings) -> MemoryPlan:
    """The plan with the fewest output blocks that fits `budget`: none when the whole factors fit, else the smallest
    power of two k dividing every tracked d_out whose plan does (settings: those of plan_memory).

    Raises ValueError when no such k fits, with the smallest peak reached and what dominates it.
    """
    widths = {l.out_features for l in layers}
    candidates = [None] + [k for k in _powers_of_two(min(widths))[1:] if all(w % k == 0 for w in widths)]
    for k in candidates:
        if plan_memory(layers, model, tokens, batch_size=1, output_blocks=k, **settings).peak <= budget:
            return plan_memory(layers, model, tokens, budget=budget, output_blocks=k, **settings)
    finest = plan_memory(layers, model, tokens, batch_size=1, output_blocks=candidates[-1], **settings)
    worst = max(finest.layers, key=lambda l: l.factors)
    raise ValueError(f"one sequence of {tokens} tokens does not fit {budget / GIB:.2f} GiB even with "
                     f"{candidates[-1] or 1} output blocks: peak {finest.peak / GIB:.2f} GiB, of which "
                     f"factors {sum(l.factors for l in finest.layers) / GIB:.2f} GiB (largest: {worst.name}, "
                     f"{worst.d_out} x {worst.d_in}: output blocks do not split its input factor Q_A); raise the budget or "
                     "track fewer layers")


def _powers_of_two(limit: int) -> list[int]:
    out, b = [], 1
    while b <= limit:
        out.append(b)
        b *= 2
    return out
