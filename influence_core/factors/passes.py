"""The fitting passes over the data (see the package docstring for the formulas):

    covariance_pass       A = (1 / sum_n T_n) sum a_t a_t^T (d_in, d_in),  S = (1 / N) sum g_t g_t^T (d_out, d_out),
                          or with k output blocks only S's diagonal blocks S_j, stored (k, b, b), b = d_out / k
    eigendecomposition    A = Q_A diag(l_A) Q_A^T, S (or each S_j) = Q_S diag(l_S) Q_S^T, in float64
    correction_pass       Lambda = (1/N) sum_n (Q_S^T D_n Q_A)^2, (d_out, d_in), block by block over the output rows;
                          with no eigenbasis (diagonal strategy) Lambda = (1/N) sum_n D_n^2

Each pass sees this rank's batches (`owned_batches`), sums in FactorArguments.dtype, all-reduces, and can be
checkpointed every K batches (`PassCheckpoint`). With FactorArguments.covariance_fraction = f the covariance pass
reads only the first ceil(f x batches) fitting batches (`leading_batch_count`), and with correction_fraction = f the
correction only those (the two splits of issue 19; either pass reads all batches by default). Sampled labels of batch
i in pass p come from
`batch_generator(seed, p, i)`, so the numbers do not depend on how batches are split over processes.

With FactorArguments.token_cache_bytes > 0 the fit reads the data once: the covariance pass keeps every batch's
per-token a (B, T, d_in) and g (B, T, d_out) in a `TokenCache`, and `correction_from_cache` computes Lambda from
them, without a second model pass. That equals `correction_pass` with the covariance pass's labels (label_pass=0),
which is what a rerun whose covariance stage was saved but whose cache is gone runs instead. With correction_fraction
only the leading batches' tokens are kept.
"""

from __future__ import annotations

import math
import os
from itertools import islice
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..batch import (Batch, check_finite, check_nonempty, real_token_activations, row_count, sequence_shape, to_device,
                     token_weights, upcast)
from ..task import IGNORE_INDEX, Task, sampled_label_surrogate, trim_padding
from ..tracking import LayerCapture, per_sequence_gradients, tracked_parameters_require_grad
from .types import FactorArguments, FactorMismatchError, rotate_tokens_first


def pseudo_gradients(model: nn.Module, task: Task, capture: LayerCapture, batch: Batch, args: FactorArguments,
                      generator: torch.Generator, dropped_columns: int = 0) -> list[dict[str, torch.Tensor]]:
    """Output pseudo-gradients g (B, T, d_out) per layer; one dict per pseudo-label draw. dropped_columns: padding
    columns trim_padding removed from the batch (the default sampler then draws the labels of the untrimmed batch).

    "sampled": one draw y ~ p per position (paper). "expected": C weighted draws whose outer products sum to
    the exact expectation, using H = diag(p) - p p^T = R R^T with R[:, c] = sqrt(p_c) (e_c - p).
    """
    capture.clear(batch)
    if args.fisher == "sampled":
        if type(task).pseudo_loss is Task.pseudo_loss:  # the default definition: its cheaper twin, same gradient
            loss = sampled_label_surrogate(*task.forward(model, batch), generator, dropped_columns)
        else:
            loss = task.pseudo_loss(model, batch, generator)
        check_finite(loss, "pseudo loss")
        return [capture.output_gradients(loss)]
    logits, labels = task.forward(model, batch)
    valid = labels != IGNORE_INDEX
    if bool((valid.sum(dim=1) > 1).any()):
        raise ValueError("fisher='expected' is exact only with one predicted position per example; use 'sampled'")
    p = torch.softmax(logits.detach().double(), dim=-1) * valid.unsqueeze(-1)
    sqrt_p = p.sqrt()
    draws = []
    num_classes = logits.shape[-1]
    for c in range(num_classes):
        r = -p * sqrt_p[..., c : c + 1]
        r[..., c] += sqrt_p[..., c]
        draws.append(capture.output_gradients((logits * r.to(logits.dtype)).sum(), retain_graph=c < num_classes - 1))
    return draws


def gradient_covariance_shape(d_out: int, blocks: int | None) -> tuple[int, ...]:
    """(d_out, d_out) for the full S, (k, d_out / k, d_out / k) for its k diagonal blocks."""
    return (d_out, d_out) if blocks is None else (blocks, d_out // blocks, d_out // blocks)


def covariance_pass(model, layers, task, batches, args: FactorArguments, checkpoint: PassCheckpoint | None = None,
                    cache: "TokenCache | None" = None) -> dict[str, torch.Tensor]:
    """{name}.activation_covariance A (d_in, d_in), {name}.gradient_covariance S (d_out, d_out) or its diagonal blocks
    (k, b, b) with args.output_blocks = k; num_tokens (real tokens) and num_sequences (N) as 0-d tensors. With
    args.covariance_fraction, over the leading batches only (leading_batch_count), and N, T counted over those.
    With a `cache`, the (a, g) per layer of the batches the correction reads (args.correction_fraction) are kept in it
    for `correction_from_cache`."""
    dtype = args.torch_dtype
    sums = {f"{l.name}.activation": torch.zeros(l.input_dim, l.input_dim, dtype=dtype) for l in layers}
    sums.update({f"{l.name}.gradient": torch.zeros(gradient_covariance_shape(l.out_features, args.output_blocks),
                                                   dtype=dtype) for l in layers})
    sums["num_tokens"] = torch.zeros((), dtype=torch.float64)
    sums["num_sequences"] = torch.zeros((), dtype=torch.float64)
    sums["num_predicted"] = torch.zeros((), dtype=torch.float64)
    kept_batches = leading_batch_count(batches, args.correction_fraction)
    with tracked_parameters_require_grad(layers), LayerCapture(layers) as capture:
        for index, batch, draws in fitting_batches(model, task, capture, batches, args, checkpoint, sums, 0,
                                                   "factors: covariance",
                                                   leading_batch_count(batches, args.covariance_fraction)):
            kept = {}
            for layer in layers:
                a = real_token_activations(task, batch, upcast(capture.activations[layer.name], dtype))
                _add_gram(sums[f"{layer.name}.activation"], a.reshape(-1, a.shape[-1]))
                gs = [upcast(grads[layer.name], dtype) for grads in draws]
                for g in gs:
                    check_finite(g, f"pseudo-gradient of layer '{layer.name}'")
                    for rows, block in _blocks(sums[f"{layer.name}.gradient"], layer.out_features):
                        _add_gram(block, g.reshape(-1, layer.out_features)[:, rows])
                kept[layer.name] = (a, gs)
            if cache is not None and (kept_batches is None or index < kept_batches):
                cache.add(kept, row_count(batch))
            del kept
            sums["num_tokens"] += float(token_weights(task, batch, a).sum())
    distributed.all_reduce_sum(sums)
    num_tokens, num_sequences = float(sums["num_tokens"]), float(sums["num_sequences"])
    if num_sequences == 0:
        raise ValueError("the fitting data is empty: no batches to fit factors on")
    _check_predicted(task, float(sums["num_predicted"]))
    out = {}
    for layer in layers:
        name = layer.name
        out[f"{name}.activation_covariance"] = sums[f"{name}.activation"] / num_tokens
        out[f"{name}.gradient_covariance"] = sums[f"{name}.gradient"] / num_sequences
        check_finite(out[f"{name}.activation_covariance"], f"activation covariance of '{name}'")
    out["num_tokens"] = torch.tensor(num_tokens)
    out["num_sequences"] = torch.tensor(num_sequences)
    return out


def leading_batch_count(batches, fraction: float | None) -> int | None:
    """How many leading fitting batches a pass reads: ceil(fraction x batches); None (all) for None.
    The product is rounded to 9 digits first, so 0.1 x 30 batches is 3, not 4."""
    if fraction is None:
        return None
    total = len(batches) if hasattr(batches, "__len__") else sum(1 for _ in batches)
    return math.ceil(round(fraction * total, 9))


def eigendecomposition(cov: dict[str, torch.Tensor], names: Sequence[str], args: FactorArguments) -> dict[str, torch.Tensor]:
    """Symmetric eigendecomposition in float64 (small matrices; precision matters for tiny eigenvalues): per layer
    {name}.{activation,gradient}_{eigenvalues,eigenvectors}; a (k, b, b) block-diagonal S gives (k, b) eigenvalues
    and (k, b, b) eigenvectors, each block decomposed on its own."""
    out = {}
    for name in names:
        for kind in ("activation", "gradient"):
            matrix = cov[f"{name}.{kind}_covariance"].double()
            values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.mT))
            out[f"{name}.{kind}_eigenvalues"] = values.to(args.torch_dtype)
            out[f"{name}.{kind}_eigenvectors"] = vectors.to(args.torch_dtype)
    return out


def correction_pass(model, layers, task, batches, args: FactorArguments, eig: dict[str, torch.Tensor] | None,
                    checkpoint: PassCheckpoint | None = None, label_pass: int = 1) -> dict[str, torch.Tensor]:
    """{name}.eigenvalues: Lambda = (1/N) sum_n (Q_S^T D_n Q_A)^2, (d_out, d_in), with D_n = sum_t g_t a_t^T; no
    rotation when eig is None. A block-diagonal Q_S (k, b, b) is applied block by block: rows j b .. (j + 1) b of
    Lambda are (1/N) sum_n (Q_Sj^T D_n[rows] Q_A)^2, so one block's (B, b, d_in) is in flight at a time. Labels are
    drawn as in pass `label_pass` (1: its own; 0: the covariance pass's, as `correction_from_cache` uses). With
    args.correction_fraction, over the leading batches only, and N counted over those."""
    dtype = args.torch_dtype
    sums = {l.name: torch.zeros(l.out_features, l.input_dim, dtype=dtype) for l in layers}
    sums["num_sequences"] = torch.zeros((), dtype=torch.float64)
    sums["num_predicted"] = torch.zeros((), dtype=torch.float64)
    with tracked_parameters_require_grad(layers), LayerCapture(layers) as capture:
        for _, batch, draws in fitting_batches(model, task, capture, batches, args, checkpoint, sums, label_pass,
                                               "factors: eigenvalue correction",
                                               leading_batch_count(batches, args.correction_fraction)):
            for layer in layers:
                a = real_token_activations(task, batch, upcast(capture.activations[layer.name], dtype))
                gs = [upcast(grads[layer.name], dtype) for grads in draws]
                _add_squared_rotated(sums[layer.name], layer, eig, a, gs)
    distributed.all_reduce_sum(sums)
    num_sequences = float(sums.pop("num_sequences"))
    if num_sequences == 0:
        raise ValueError("the fitting data is empty: no batches to fit factors on")
    _check_predicted(task, float(sums.pop("num_predicted")))
    return {f"{name}.eigenvalues": s / num_sequences for name, s in sums.items()}


def correction_from_cache(layers, cache: "TokenCache", args: FactorArguments,
                          eig: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Lambda as in correction_pass, from the (a, g) the covariance pass kept (no model pass); N = the kept sequences
    over all ranks. Each batch's entries are released once used, so the cache empties."""
    sums = {l.name: torch.zeros(l.out_features, l.input_dim, dtype=args.torch_dtype) for l in layers}
    sums["num_sequences"] = torch.tensor(float(cache.sequences), dtype=torch.float64)
    for kept in tqdm(cache.drain(), desc="factors: eigenvalue correction (cached tokens)", total=len(cache),
                     disable=not args.progress or not distributed.is_main(), leave=False):
        for layer in layers:
            a, gs = kept.pop(layer.name)
            _add_squared_rotated(sums[layer.name], layer, eig, a, gs)
    distributed.all_reduce_sum(sums)
    num_sequences = float(sums.pop("num_sequences"))
    return {f"{name}.eigenvalues": s / num_sequences for name, s in sums.items()}


def _add_squared_rotated(target: torch.Tensor, layer, eig: dict[str, torch.Tensor] | None, a: torch.Tensor,
                         gs: list[torch.Tensor]) -> None:
    """target (d_out, d_in) += sum_n (Q_S^T D_n Q_A)^2 over a batch's sequences and label draws, D_n = g_n^T a_n
    from a (B, T, d_in) and each g (B, T, d_out); in the parameter basis when eig is None."""
    q_a = q_s = None
    if eig is not None:
        q_a = eig[f"{layer.name}.activation_eigenvectors"].to(a.device)
        q_s = eig[f"{layer.name}.gradient_eigenvectors"].to(a.device)
    blocks = list(_blocks(q_s, layer.out_features))
    block_size = blocks[0][0].stop - blocks[0][0].start
    tokens_first = q_a is not None and rotate_tokens_first(a.shape[1], block_size, layer.input_dim)
    if tokens_first:
        a = a @ q_a
    for g in gs:
        for rows, q_sj in blocks:
            if tokens_first:
                per_sequence = per_sequence_gradients(a, g[..., rows] @ q_sj)  # rotated D_n, (B, b, d_in)
            else:
                per_sequence = per_sequence_gradients(a, g[..., rows])
                if q_a is not None:
                    per_sequence = q_sj.T @ per_sequence @ q_a
            target[rows] += per_sequence.square_().sum(dim=0).cpu()


class TokenCache:
    """The per-token a (B, T, d_in) and g (B, T, d_out) of every tracked layer, batch by batch, that the covariance
    pass keeps for `correction_from_cache` (FactorArguments.token_cache_bytes). Refuses to grow past its budget:
    `check_budget` before the pass from the batch shapes, `add` during it from the real sizes. A tensor is kept as
    it is when it owns exactly its storage, else copied, so the bytes counted are the bytes held. (Copying every
    tensor into 256 MiB slabs, outside the C heap, was measured too: the same fit time within the run-to-run noise
    on zoo_s, N = 1,000, at the cost of a copy.)"""

    def __init__(self, budget_bytes: int):
        self.budget, self.nbytes, self.batches, self.sequences = budget_bytes, 0, [], 0

    def __len__(self) -> int:
        return len(self.batches)

    def check_budget(self, layers, batches, args: FactorArguments) -> None:
        """Refuse, before any model pass, fitting data whose padded batch shapes need more than the budget: per batch
        B T sum_l (d_in + d_out) x bytes of the accumulation dtype, this rank's share of the batches kept (all, or the
        leading ones args.correction_fraction names)."""
        if not hasattr(batches, "__len__") or len(batches) == 0:
            return
        shape = sequence_shape(next(iter(batches)))
        if shape is None:
            return
        per_token = sum(l.input_dim + l.out_features for l in layers) * torch.finfo(args.torch_dtype).bits // 8
        mine = math.ceil((leading_batch_count(batches, args.correction_fraction) or len(batches))
                         / distributed.world_size())
        need = mine * shape[0] * shape[1] * per_token
        if need > self.budget:
            raise ValueError(self._message(need, f"{mine} batches of {shape[0]} x {shape[1]} tokens"))

    def add(self, kept: dict[str, tuple[torch.Tensor, list[torch.Tensor]]], sequences: int) -> None:
        self.nbytes += sum(t.numel() * t.element_size() for a, gs in kept.values() for t in (a, *gs))
        if self.nbytes > self.budget:
            raise ValueError(self._message(self.nbytes, f"the first {len(self.batches) + 1} batches"))
        self.batches.append({name: (self._keep(a), [self._keep(g) for g in gs]) for name, (a, gs) in kept.items()})
        self.sequences += sequences

    def drain(self):
        """The kept batches in order, each dropped from the cache as it is handed out."""
        self.batches.reverse()
        while self.batches:
            yield self.batches.pop()

    @staticmethod
    def _keep(t: torch.Tensor) -> torch.Tensor:
        """t itself when it is contiguous and its storage holds nothing else; else a copy that is."""
        owns_its_storage = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        return t if owns_its_storage else t.clone(memory_format=torch.contiguous_format)

    def _message(self, need: int, what: str) -> str:
        return (f"FactorArguments.token_cache_bytes={self.budget} is too small: the per-token activations and "
                f"pseudo-gradients of {what} need {need / 2**20:.0f} MiB; raise it above {need}, or set it to 0 for a "
                "second model pass over the data instead")


def _blocks(q_s: torch.Tensor | None, d_out: int) -> list[tuple[slice, torch.Tensor | None]]:
    """[(output rows, block)]: for a 2-D matrix (or None: the parameter basis) one block of all d_out rows, for a
    (k, b, b) stack the k blocks, rows j b .. (j + 1) b."""
    if q_s is None or q_s.dim() == 2:
        return [(slice(0, d_out), q_s)]
    size = q_s.shape[1]
    return [(slice(j * size, (j + 1) * size), q_s[j]) for j in range(q_s.shape[0])]


def _add_gram(target: torch.Tensor, x: torch.Tensor) -> None:
    """target += x^T x for x (tokens, d); in place on the CPU (a fresh (d, d) temporary per batch is slow)."""
    if x.device == target.device:
        target.addmm_(x.T, x)
    else:
        target.add_((x.T @ x).cpu())


def fitting_batches(model: nn.Module, task: Task, capture: LayerCapture, batches, args: FactorArguments,
                    checkpoint: "PassCheckpoint | None", sums: dict[str, torch.Tensor], pass_index: int, desc: str,
                    limit: int | None = None):
    """The batch loop both fitting passes share: (index, batch, pseudo-gradient draws) for each of this rank's counted
    batches among the first `limit` (None: all), trimmed of padding and on the model's device (labels drawn from
    batch_generator(seed, pass, index)). After the caller has added the batch to `sums`, num_sequences and
    num_predicted are counted and the pass checkpoint steps."""
    for index, batch, counted in owned_batches(model, batches, checkpoint, sums, desc, args.progress, limit):
        batch, dropped = trim_padding(to_device(batch, model))
        draws = pseudo_gradients(model, task, capture, batch, args, batch_generator(args.seed, pass_index, index),
                                 dropped)
        if not counted:
            continue  # a sharded model's filler pass: it only joins the other ranks' weight all-gathers
        yield index, batch, draws
        sums["num_sequences"] += row_count(batch)
        sums["num_predicted"] += _predicted(task, batch)
        if checkpoint is not None:
            checkpoint.step(index, sums)


def batch_generator(seed: int, pass_index: int, batch_index: int) -> torch.Generator:
    """The generator of the sampled labels of one fitting batch: a function of (seed, pass, batch index) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + batch_index) * 4 + pass_index)


class PassCheckpoint:
    """Running sums of a fitting pass saved every K batches (atomically), and restored on a rerun.

    One file per rank: `<stage>.partial.rank<r>.safetensors`, holding this rank's sums (before the all-reduce)
    and, in its metadata, the index of the next batch and the world size it was made with.
    """

    def __init__(self, path: Path, every: int):
        self.path, self.every = path, every
        self.next_batch = 0
        self._since_save = 0

    def restore(self, sums: dict[str, torch.Tensor]) -> None:
        """Load saved sums into `sums` in place and set `next_batch`; nothing to do without a file."""
        if not self.path.exists():
            return
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                saved = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as error:  # a damaged file (SafetensorError)
            raise ValueError(f"pass checkpoint {self.path} is damaged ({error}); delete it and rerun to recompute "
                             "the pass") from error
        if int(meta.get("world_size", -1)) != distributed.world_size():
            raise FactorMismatchError(
                f"pass checkpoint {self.path} was written by a run with world_size={meta.get('world_size')}, "
                f"this run has {distributed.world_size()}; rerun with the same number of processes or delete it"
            )
        if set(saved) != set(sums) or any(saved[k].shape != sums[k].shape for k in sums):
            raise FactorMismatchError(f"pass checkpoint {self.path} holds other tensors than this pass; delete it")
        for key, value in saved.items():
            sums[key].copy_(value)
        self.next_batch = int(meta["next_batch"])

    def step(self, index: int, sums: dict[str, torch.Tensor]) -> None:
        """Called after batch `index` was added to the sums; saves every `every` batches of this rank."""
        self._since_save += 1
        if self._since_save >= self.every:
            self.save(index + 1, sums)

    def save(self, next_batch: int, sums: dict[str, torch.Tensor]) -> None:
        tmp = self.path.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in sums.items()}, str(tmp),
                  metadata={"next_batch": str(next_batch), "world_size": str(distributed.world_size()),
                            "rank": str(distributed.rank())})
        os.replace(tmp, self.path)
        self._since_save = 0


def checkpoint_path(directory: Path, stage: str) -> Path:
    return directory / f"{stage}.partial.rank{distributed.rank()}.safetensors"


def owned_batches(model: nn.Module, batches, checkpoint: PassCheckpoint | None, sums: dict[str, torch.Tensor],
                   desc: str, progress: bool, limit: int | None = None):
    """(global index, batch, counted) for this rank's batches (index mod world_size == rank) among the first `limit`
    (None: all; the rest are not read), after a restored checkpoint, all counted. For a model sharded over the ranks
    (FSDP) every forward pass is a collective, so a rank with fewer batches then repeats one, counted False (run, not
    added), until it has run as many as the others.
    """
    start = 0
    if checkpoint is not None:
        checkpoint.restore(sums)
        start = checkpoint.next_batch
    total = len(batches) if hasattr(batches, "__len__") else sum(1 for _ in batches)
    if limit is not None:
        total = min(total, limit)
    mine = sum(1 for index in range(start, total) if distributed.owns(index))
    extra = distributed.padding_rounds(model, mine)  # before the first forward: it is a collective too
    bar = tqdm(islice(batches, total), desc=desc, total=total, disable=not progress or not distributed.is_main(),
               leave=False, initial=0)
    filler = None
    for index, batch in enumerate(bar):
        if index < start or not distributed.owns(index):
            continue
        check_nonempty(batch, index, "fitting")
        filler = (index, batch)
        yield index, batch, True
    if extra:
        filler = filler or (0, next(iter(batches)))
        for _ in range(extra):
            yield filler[0], filler[1], False


# helpers


def _predicted(task: Task, batch: Batch) -> float:
    """Predicted (non-ignored) labels of a batch, 0 when the task cannot tell without a forward pass."""
    counts = task.label_counts(batch)
    return 0.0 if counts is None else float(counts.sum())


def _check_predicted(task: Task, num_predicted: float) -> None:
    """Refuse fitting data with nothing to predict (all sequences of one token): the curvature would be 0."""
    if num_predicted == 0 and type(task).label_counts is not Task.label_counts:
        raise ValueError("the fitting data has no predicted tokens: every sequence has fewer than 2 tokens (or all "
                         "labels are -100), so the curvature and damping would be 0; fit on sequences of >= 2 tokens")
