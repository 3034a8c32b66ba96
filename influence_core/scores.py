"""Query gradients, their preconditioning, and influence scores (total, per layer, per token).

Sign convention (paper Eq 24-25, f = log p(completion | prompt)):

    I_f(z) = -grad f^T (G + lambda I)^{-1} grad L(z) = q^T (G + lambda I)^{-1} r(z)

with q = grad(-f), the gradient of the query's completion loss, and r(z) = grad L(z), the training loss of
sequence z summed over its tokens. Positive influence: adding z (up-weighting its loss) raises log p(completion).
Units: nats of log p(completion) per unit of epsilon, the weight of z's loss next to the mean training loss
(paper Eq 7); one added copy among N sequences is epsilon = 1/N. No division by N, no normalisation.

Splits (paper Eq 30-31): I = sum_l q_l'^T r_l with q_l' the preconditioned query of layer l, and
r_l = sum_t g_t a_t^T, so the token-wise influence of input token t is sum_l g_{l,t}^T q_l' a_{l,t}.

Query batching (paper Sec 3.2, `lowrank.py`): with ScoreArguments(query_rank=r) each layer whose preconditioned
query has rank above r is truncated by SVD to U_s V^T (stored: r (d_out + d_in) numbers per query) and scored
either by the factored contraction sum_t (g_t^T U_s)(V^T a_t), cost B T Q r (d_out + d_in), which never forms the
per-sequence gradient, or, when the rank-r matrices fit in `dense_query_bytes`, by the dense contraction with
them, cost B T d_out d_in + B Q d_out d_in (+ B T Q d_out d_in for token scores): the cheaper per batch and
layer. Both give the same numbers; layers already of rank <= r keep the exact dense queries.

Pooled contraction (opt-in): the dense product (Q, P) x (P, B) streams a layer's Q P query numbers from memory for
only B sequences. With ScoreArguments(pool_bytes=b) compute_scores keeps the captured a and g of consecutive
training batches up to b bytes and contracts them in one product per layer (`pooled_scores`): the same numbers,
batch by batch as given. Off by default: on the bench's gpt2_m (Q = 128) a 64 MiB pool was 3-6% faster and raised
the peak by 60-80 MiB (figures/bench/README.md, "Memory at Q = 128, the workload").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .batch import (SOURCE_ROWS, Batch, accumulation_dtype, check_finite, check_nonempty, eval_mode, model_device,
                    real_token_activations, refuse_reordered, return_freed_host_memory, row_count, to_device, upcast)
from .factors.types import FactorMismatchError, Factors, check_number
from .lowrank import (LowRankQuery, check_rank, compress_queries, flatten_factors,
                      low_rank_token_scores, uses_low_rank)
from .task import Task, trim_padding
from .tracking import (LayerCapture, TrackedLayer, layer_fingerprints, per_sequence_gradients,
                       tracked_parameters_require_grad)


@dataclass
class ScoreArguments:
    per_token: bool = False  # also return token-wise influence (costs one more contraction per query)
    progress: bool = True
    query_rank: int | None = None  # rank of each layer's preconditioned query (paper: 32); None: full rank
    low_rank: bool | None = None  # None: compress where query_rank truncates; True: every layer, factored path; False: none
    dense_query_bytes: int = 2**30  # rank-r queries also kept dense (for the cheaper path) while they fit in this
    low_rank_chunk: int = 2**22  # at most this many (token x query x rank) products in flight per layer
    output_blocks: int | None = None  # dense layers: contract k blocks of output rows one after another (None: at once)
    pool_bytes: int = 0  # dense layers: training batches pooled up to this many bytes (`pooled_scores`); 0: each alone

    def __post_init__(self) -> None:
        for name in ("per_token", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ScoreArguments.{name} must be True or False, got {getattr(self, name)!r}")
        if self.low_rank is not None and not isinstance(self.low_rank, bool):
            raise TypeError(f"ScoreArguments.low_rank must be None, True or False, got {self.low_rank!r}")
        if self.query_rank is not None:
            check_rank(self.query_rank)
        check_number("dense_query_bytes", self.dense_query_bytes, 0, integer=True)
        check_number("low_rank_chunk", self.low_rank_chunk, 1, integer=True)
        if self.output_blocks is not None:
            check_number("output_blocks", self.output_blocks, 1, integer=True)
        check_number("pool_bytes", self.pool_bytes, 0, integer=True)


class LayerGradients(dict):
    """{layer name: (Q, d_out, d_in) tensor} that remembers the fingerprints of the layers it was computed on, so
    preconditioning and scoring can refuse factors or a model other than that one."""

    def __init__(self, tensors, layer_fingerprints: dict[str, str] | None = None):
        super().__init__(tensors)
        self.layer_fingerprints = dict(layer_fingerprints or {})


@dataclass
class InfluenceScores:
    """Influence of each training sequence on each query.

    total:     (Q, N)        influence, sum over layers
    per_layer: (Q, N, L)     split over tracked layers, in the order of `layer_names`
    per_token: (Q, N, T)     split over the training sequence's input tokens (zero at padding), or None
    """

    query_names: list[str]
    layer_names: list[str]
    total: torch.Tensor
    per_layer: torch.Tensor
    per_token: torch.Tensor | None = None

    def top(self, query: str | int, k: int = 10) -> list[tuple[int, float]]:
        """The k most positively influential training sequences of a query: [(train index, influence)]."""
        row = self.query_names.index(query) if isinstance(query, str) else query
        values, indices = torch.topk(self.total[row], min(k, self.total.shape[1]))
        return [(int(i), float(v)) for i, v in zip(indices, values)]


def dense_scores(queries: torch.Tensor, per_sequence: torch.Tensor) -> torch.Tensor:
    """sum_{o,i} q[k,o,i] D[n,o,i]: q (Q, d_out, d_in), D (B, d_out, d_in) -> (Q, B), as one (Q, P) x (P, B) matmul.

    torch.einsum("qoi,boi->qb") permuted and copied the Q preconditioned queries for every batch and layer: 10x
    slower at Q = 128.
    """
    return queries.reshape(queries.shape[0], -1) @ per_sequence.reshape(per_sequence.shape[0], -1).T


def query_gradients(model: nn.Module, layers: Sequence[TrackedLayer], task: Task, batches: Iterable[Batch],
                    progress: bool = True, factors: Factors | None = None,
                    query_rank: int | None = None) -> dict[str, torch.Tensor | LowRankQuery]:
    """q_l = grad of each query's completion loss w.r.t. layer l, canonical layout, (Q, d_out, d_in) per layer.

    With `factors`, each batch of gradients is preconditioned as it comes, (G_l + lambda_l I)^{-1} q_l, the same as
    precondition_queries(query_gradients(...), factors) without ever holding the raw gradients of all Q queries
    beside the preconditioned ones (peak memory ~1x instead of ~2x the Q queries' size).

    With `query_rank` r (needs `factors`) each batch's preconditioned queries are also truncated as they come, per
    layer where r < min(d_out, d_in), to LowRankQuery (Q r (d_out + d_in) numbers): the same result as
    compress_queries(query_gradients(..., factors), r), query by query, without ever holding the full-rank queries
    of all Q (at Pythia-160m's shapes 29 GB for Q = 128, against 1.5 GB at rank 32).

    Raises ValueError for a query with no predicted label (all -100: its gradient would be 0 and it would score 0
    everywhere), and FactorMismatchError for factors of other layers or another model.
    """
    if factors is not None:
        factors.check_layers(layers)
    if query_rank is not None:
        check_rank(query_rank)
        if factors is None:
            raise ValueError("query_rank truncates the preconditioned queries (paper Sec 3.2): give factors too, or "
                             "compress after precondition_queries with compress_queries")
    collected: dict[str, list] = {l.name: [] for l in layers}
    rows: list[torch.Tensor] = []  # each batch's rows' indices among the queries (SOURCE_ROWS when grouped by length)
    seen = 0
    with eval_mode(model), tracked_parameters_require_grad(layers), LayerCapture(layers) as capture:
        for index, batch in enumerate(tqdm(batches, desc="query gradients", disable=not progress, leave=False)):
            check_nonempty(batch, index, "query")
            rows.append(batch[SOURCE_ROWS].cpu() if SOURCE_ROWS in batch else torch.arange(seen, seen + row_count(batch)))
            _check_query_labels(task, batch, rows[-1])
            seen += row_count(batch)
            batch, _ = trim_padding(to_device(batch, model))
            capture.clear(batch)
            loss = task.query_loss(model, batch)
            check_finite(loss, "query loss")
            grads = capture.output_gradients(loss)
            for layer in layers:
                # a, g upcast first: the outer products sum over tokens in float32 at least, not the model's bf16
                a = real_token_activations(task, batch, upcast(capture.activations[layer.name]))
                g = upcast(grads[layer.name], a.dtype)
                check_finite(a, f"query activations of layer '{layer.name}'")
                check_finite(g, f"query output gradients of layer '{layer.name}'")
                if factors is None:
                    d = per_sequence_gradients(a, g)
                else:  # preconditioned (and truncated where r < min(d_out, d_in)) from a and g: no D_n formed first
                    rank = query_rank if uses_low_rank((layer.out_features, layer.input_dim), query_rank) else None
                    d = factors.precondition_query(layer.name, a, g, rank)
                collected[layer.name].append(d.to("cpu"))
            del grads, loss, a, g, d
            return_freed_host_memory()  # the batch's temporaries, kept by glibc's heap otherwise (batch.py)
    if not collected[layers[0].name]:
        raise ValueError("no queries given")
    # layer by layer, each layer's parts freed once joined: peak one layer above the result, not the whole result
    positions = torch.cat(rows)  # where each computed row goes in the result
    if torch.equal(positions, torch.arange(len(positions))):
        positions = None
    elif not torch.equal(positions.sort().values, torch.arange(len(positions))):
        raise ValueError(f"the query batches' {SOURCE_ROWS} are not a permutation of 0..{len(positions) - 1}: give "
                         "each query once, batched by one iterate_batches call")
    joined = {}
    for name in list(collected):
        joined[name] = _joined(collected.pop(name), positions)
        return_freed_host_memory()
    return LayerGradients(joined, layer_fingerprints(layers))


def _check_query_labels(task: Task, batch: Batch, rows: torch.Tensor) -> None:
    """Refuse queries without a predicted label: their measurement is empty, their influence 0 everywhere."""
    counts = task.label_counts(batch)
    if counts is None:
        return
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        names = batch.get("names") or batch.get("query_names")
        which = ", ".join(f"{int(rows[i])}" + (f" ('{names[i]}')" if names is not None else "") for i in empty)
        raise ValueError(f"query {which} has no completion label (all labels -100 after the shift, e.g. the "
                         "completion was truncated away): it would score 0 everywhere; give each query completion labels")


def _joined(parts: list, positions: torch.Tensor | None = None) -> torch.Tensor | LowRankQuery:
    """The batches' parts of one layer joined over queries (tensors, or LowRankQuery factors); with `positions`, the
    k-th row of the parts (in batch order) lands at row positions[k] of the result."""
    if isinstance(parts[0], LowRankQuery):
        return LowRankQuery(_rows_joined([p.left for p in parts], positions),
                            _rows_joined([p.right for p in parts], positions))
    return _rows_joined(parts, positions)


def _rows_joined(parts: list[torch.Tensor], positions: torch.Tensor | None) -> torch.Tensor:
    """torch.cat(parts), or its rows scattered to `positions`, written once into one tensor of the result's size."""
    if positions is None:
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    out = parts[0].new_empty((len(positions), *parts[0].shape[1:]))
    start = 0
    for part in parts:
        out[positions[start:start + len(part)]] = part
        start += len(part)
    return out


def precondition_queries(gradients: dict[str, torch.Tensor], factors: Factors) -> dict[str, torch.Tensor]:
    """q_l' = (G_l + lambda_l I)^{-1} q_l for every layer; (Q, d_out, d_in) per layer.

    Refuses (FactorMismatchError) factors missing a layer, fitted for other layer shapes, or, for gradients from
    `query_gradients` (which remember the model's layer fingerprints), fitted on another model.
    """
    factors.check_shapes({name: tuple(g.shape[-2:]) for name, g in gradients.items()})
    prints = getattr(gradients, "layer_fingerprints", {})
    factors.check_fingerprints(prints)
    return LayerGradients({name: factors.precondition(name, g) for name, g in gradients.items()}, prints)


def _check_queries_match(layers: Sequence[TrackedLayer], queries: dict) -> None:
    """Refuse preconditioned queries of other layer shapes, or (when they carry fingerprints) of another model."""
    for layer in layers:
        shape = tuple(queries[layer.name].shape[-2:])
        if shape != (layer.out_features, layer.input_dim):
            raise FactorMismatchError(
                f"the query gradients of layer '{layer.name}' have shape (d_out, d_in+1) = {shape}, the layer is "
                f"{(layer.out_features, layer.input_dim)}: they come from another model; recompute them on this one")
    saved = getattr(queries, "layer_fingerprints", None)
    if saved:
        for name, value in layer_fingerprints(layers).items():
            if name in saved and saved[name] != value:
                raise FactorMismatchError(
                    f"the query gradients of layer '{name}' were computed on a model with fingerprint {saved[name]}, "
                    f"this model's is {value}: recompute them (and their factors) on this model")


# compute_scores hands glibc's freed heap back every this many training batches and after its pass. Every batch
# needs the same temporaries, so trimming after each one made the next fault its pages in anew (gpt2_m, Q = 128:
# +5-6 s of system time on a 10 s pass, for 60 MiB less peak); never trimming let the retained heap grow with N
# (gpt2_s, N = 10,000, Q = 32: peak 1,000-1,025 MiB, 799 MiB trimming every 64 batches at no measurable cost;
# benchmarks/memory_return.py, figures/bench/README.md)
TRIM_EVERY_BATCHES = 64


def compute_scores(model: nn.Module, layers: Sequence[TrackedLayer], task: Task, batches: Iterable[Batch],
                   preconditioned_queries: dict[str, torch.Tensor], query_names: Sequence[str] | None = None,
                   args: ScoreArguments | None = None) -> InfluenceScores:
    """Influence of every training sequence in `batches` on every preconditioned query, in one pass."""
    args = args or ScoreArguments()
    names = [l.name for l in layers]
    if set(names) != set(preconditioned_queries):
        raise ValueError(f"query gradients cover layers {sorted(preconditioned_queries)}, scoring tracks {sorted(names)}")
    _check_queries_match(layers, preconditioned_queries)
    first = next(iter(preconditioned_queries.values()))
    num_queries = first.shape[0]
    query_names = list(query_names) if query_names is not None else [f"query_{i}" for i in range(num_queries)]
    if len(query_names) != num_queries:
        raise ValueError(f"{len(query_names)} query names for {num_queries} preconditioned queries")
    per_layer_parts, per_token_parts = [], []
    device = model_device(model)
    if args.query_rank is not None or args.low_rank is not None:
        preconditioned_queries = compress_queries(preconditioned_queries, args.query_rank, args.low_rank)
        return_freed_host_memory()  # the truncations' SVD workspaces
    # queries in float32 at least: the model's a and g are upcast to them, so every contraction runs in that dtype
    queries = {n: q.to(device, accumulation_dtype(q.dtype)) if isinstance(q, LowRankQuery)
               else q.to(device, accumulation_dtype(q.dtype)).contiguous() for n, q in preconditioned_queries.items()}
    # Rank-r layers are kept in one more form, built on first use: their factors laid side by side (in query chunks
    # that bound the (tokens, Q r) temporaries) for the factored contraction, or their rank-r matrices rebuilt dense
    # (while they fit dense_query_bytes) where the dense contraction is cheaper at the batch's shape. With fixed-shape
    # training batches a layer needs only one of the two: the other is never built (gpt2_m, Q = 128: 80 MiB less).
    lowrank = {n for n, q in queries.items() if isinstance(q, LowRankQuery)}
    may_rebuild = _dense_candidates(queries, lowrank, args)
    factored: dict[str, list] = {}
    dense = {n: q for n, q in queries.items() if n not in lowrank}  # rank-r layers join it once rebuilt
    budget = _pool_budget(args)
    row_bytes = max((_dense_nbytes(queries[n]) // num_queries for n in {*dense, *may_rebuild}),
                    default=0)  # D of one sequence, largest layer
    pool: list[dict] = []  # per pooled batch {layer: its (Q, B) scores, or its (a, g) to contract at the flush}
    pooled_bytes = pooled_rows = 0
    with eval_mode(model), tracked_parameters_require_grad(layers), LayerCapture(layers) as capture:
        for index, batch in enumerate(tqdm(batches, desc="scores", disable=not args.progress, leave=False)):
            check_nonempty(batch, index, "training")
            refuse_reordered(batch, "compute_scores")
            batch, dropped = trim_padding(to_device(batch, model))  # per-token scores get the dropped columns back
            capture.clear(batch)
            loss = task.training_loss(model, batch)
            check_finite(loss, "training loss")
            grads = capture.output_gradients(loss)
            parts, held, token_scores = {}, 0, 0.0
            for layer in layers:
                q = queries[layer.name]  # (Q, d_out, d_in), or its rank-r factors
                a = real_token_activations(task, batch, upcast(capture.activations[layer.name], q.dtype))
                g = upcast(grads[layer.name], q.dtype)
                if layer.name in may_rebuild and _dense_is_cheaper(q, a.shape[0], a.shape[1], args.per_token):
                    if layer.name not in dense:
                        dense[layer.name] = q.dense()
                    q = dense[layer.name]  # the same rank-r matrices, dense: fewer flops here
                if isinstance(q, LowRankQuery):
                    if layer.name not in factored:
                        factored[layer.name] = _factor_chunks(q, args.low_rank_chunk)
                    tokens = _low_rank_tokens(a, g, factored[layer.name])  # (Q, B, T)
                    parts[layer.name] = tokens.sum(dim=-1)
                    if args.per_token:
                        token_scores = token_scores + tokens
                    continue
                if budget:
                    parts[layer.name] = (a, g)
                    held += (a.numel() + g.numel()) * a.element_size()
                    continue
                scores, tokens = dense_layer_scores(q, a, g, args.per_token, args.output_blocks)
                parts[layer.name] = scores
                if args.per_token:
                    token_scores = token_scores + tokens
            rows = row_count(batch)
            held += rows * row_bytes if budget else 0  # with the largest layer's D_n at the flush
            if pool and pooled_bytes + held > budget:  # flushed first: the pool never holds more than the budget
                per_layer_parts.append(pooled_scores(pool, names, dense))
                pool, pooled_bytes, pooled_rows = [], 0, 0
            pool.append(parts)
            pooled_bytes, pooled_rows = pooled_bytes + held, pooled_rows + rows
            if not budget or pooled_bytes >= budget or pooled_rows >= POOL_MAX_SEQUENCES:
                per_layer_parts.append(pooled_scores(pool, names, dense))
                pool, pooled_bytes, pooled_rows = [], 0, 0
            del grads, loss, a, g, parts
            if index % TRIM_EVERY_BATCHES == TRIM_EVERY_BATCHES - 1:
                return_freed_host_memory()
            if args.per_token:
                if dropped:  # zeros on the trimmed padding columns
                    token_scores = torch.nn.functional.pad(token_scores, (0, dropped))
                per_token_parts.append(token_scores.cpu())
        if pool:
            per_layer_parts.append(pooled_scores(pool, names, dense))
        del pool
    return_freed_host_memory()
    if not per_layer_parts:
        raise ValueError("the training data is empty: no batches to score")
    per_layer = torch.cat(per_layer_parts, dim=1)
    per_token = None
    if args.per_token:
        width = max(t.shape[-1] for t in per_token_parts)
        per_token = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in per_token_parts], dim=1)
    return InfluenceScores(query_names, names, per_layer.sum(dim=-1), per_layer, per_token)



# Training sequences pooled for one dense contraction at most: past ~128 the (Q, P) x (P, n) product gains little
# more (gpt2_m's 512 x 129 layer, Q = 128, one thread: 0.43 ms per sequence at n = 16, 0.24 at 64, 0.21 at 128, 0.20
# at 256; benchmarks/pooled_scores.py, figures/bench/README.md).
POOL_MAX_SEQUENCES = 128


def _dense_nbytes(query: torch.Tensor | LowRankQuery) -> int:
    """Bytes of a layer's queries as dense (Q, d_out, d_in) matrices (rank-r ones: once rebuilt)."""
    if isinstance(query, LowRankQuery):
        q, d_out, d_in = query.shape
        return q * d_out * d_in * query.left.element_size()
    return query.numel() * query.element_size()


def _pool_budget(args: ScoreArguments) -> int:
    """Bytes of captured activations and output gradients that may be pooled over training batches (0: none): the
    requested pool_bytes; none for token scores and output blocks, which contract batch by batch (their own memory
    bounds)."""
    if args.per_token or args.output_blocks is not None:
        return 0
    return args.pool_bytes


def _dense_candidates(queries: dict, lowrank: set[str], args: ScoreArguments) -> set[str]:
    """The rank-r layers whose rank-r matrices may be rebuilt dense: in order, while their dense bytes fit
    args.dense_query_bytes (none with low_rank=True, which forces the factored contraction)."""
    if args.low_rank is True:
        return set()
    chosen, budget = set(), args.dense_query_bytes
    for name in queries:
        if name in lowrank:
            q = queries[name]
            size = _dense_nbytes(q)
            if size <= budget:
                chosen.add(name)
                budget -= size
    return chosen


def pooled_scores(pool: list[dict], names: Sequence[str], dense: dict[str, torch.Tensor]) -> torch.Tensor:
    """(Q, n, L) per-layer scores of the n = sum B_k rows of the pooled batches, in batch order.

    Each pooled batch holds, per layer, either its (Q, B_k) scores or its (a (B_k, T_k, d_in), g (B_k, T_k, d_out)).
    A layer's D_n = sum_t g_t a_t^T of all batches are written into one (n, d_out, d_in) tensor, batch by batch (any
    T_k), and contracted with the layer's dense queries in one (Q, P) x (P, n) product: the same numbers as batch by
    batch, up to summation order. Each layer's (a, g) are released from the pool once its D_n are formed.
    """
    columns = []
    for name in names:
        pooled = [isinstance(parts[name], tuple) for parts in pool]
        contracted = iter(())
        if any(pooled):
            queries = dense[name]
            rows = [parts[name][0].shape[0] for parts, p in zip(pool, pooled) if p]
            per_sequence = queries.new_empty((sum(rows), *queries.shape[1:]))
            for piece, parts in zip(per_sequence.split(rows), (parts for parts, p in zip(pool, pooled) if p)):
                a, g = parts[name]
                per_sequence_gradients(a, g, out=piece)
                parts[name] = None
            del a, g
            contracted = iter(dense_scores(queries, per_sequence).split(rows, dim=1))
            del per_sequence
        pieces = [next(contracted) if p else parts[name] for parts, p in zip(pool, pooled)]
        columns.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1))
    stacked = torch.stack(columns, dim=-1)  # (Q, n, L)
    check_finite(stacked, "influence scores")
    return stacked.cpu()


def dense_layer_scores(q: torch.Tensor, a: torch.Tensor, g: torch.Tensor, per_token: bool,
                       output_blocks: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer's scores sum_{o,i} q[k,o,i] D[n,o,i], (Q, B), and with per_token its token split
    sum_o g_{t,o} (q a_t)_o, (Q, B, T), without forming per-token gradients; q (Q, d_out, d_in), a (B, T, d_in),
    g (B, T, d_out). With k output blocks the rows o are taken k slices at a time and the parts summed (the same
    numbers up to summation order), so only (B, d_out / k, d_in) of D and (Q, B, T, d_out / k) of q a_t are in flight.
    """
    d_out = q.shape[1]
    if output_blocks is None:
        return _dense_rows(q, a, g, per_token)
    if d_out % output_blocks:
        raise ValueError(f"output_blocks={output_blocks} does not divide d_out={d_out}; choose a divisor of every "
                         "tracked layer's output width")
    size = d_out // output_blocks
    parts = [_dense_rows(q[:, j * size : (j + 1) * size], a, g[..., j * size : (j + 1) * size], per_token)
             for j in range(output_blocks)]
    return sum(p[0] for p in parts), (sum(p[1] for p in parts) if per_token else None)


def _dense_rows(q: torch.Tensor, a: torch.Tensor, g: torch.Tensor, per_token: bool):
    """(Q, B) scores and (Q, B, T) token scores (None without per_token) of the output rows q and g hold."""
    scores = dense_scores(q, per_sequence_gradients(a, g))
    if not per_token:
        return scores, None
    return scores, torch.einsum("bto,qbto->qbt", g, torch.einsum("qoi,bti->qbto", q, a))


def _factor_chunks(query: LowRankQuery, budget: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Split the queries into chunks of at most budget / (r x 512 tokens) queries, each flattened for two matmuls."""
    per_chunk = max(1, budget // (query.rank * 512))
    chunks = []
    for start in range(0, query.num_queries, per_chunk):
        left, right = flatten_factors(query.select(slice(start, start + per_chunk)))
        chunks.append((left, right, query.rank))
    return chunks


def _low_rank_tokens(a: torch.Tensor, g: torch.Tensor, chunks) -> torch.Tensor:
    """Token-wise scores of every query chunk, concatenated: (Q, B, T)."""
    parts = [low_rank_token_scores(a, g, left, right, rank) for left, right, rank in chunks]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _dense_is_cheaper(query: LowRankQuery, batch: int, tokens: int, per_token: bool) -> bool:
    """Multiply-adds of the dense contraction (per-sequence gradients, then Q inner products; plus Q T d_out d_in
    for token scores) against the factored one (two (B T, Q r) products)."""
    num_queries, d_out, d_in = query.shape
    dense = batch * tokens * d_out * d_in + batch * num_queries * d_out * d_in
    if per_token:
        dense += batch * tokens * num_queries * d_out * d_in
    factored = batch * tokens * num_queries * query.rank * (d_out + d_in)
    return dense < factored
