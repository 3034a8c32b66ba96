"""Small helpers on batches (dicts of tensors whose first dimension is the row, i.e. sequence, index): row counts,
devices, padding masks, finiteness checks, the eval-mode context every pass runs in; and the precision rule of the
engine: the model runs in its own dtype (bf16/fp16/fp32), everything the engine sums or contracts runs in
`accumulation_dtype` (float32 at least)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

import torch
from torch import nn

if TYPE_CHECKING:
    from .task import Task

Batch = Mapping[str, Any]


# the key under which a batch of iterate_batches(..., by_length=True) carries its rows' indices in the data set
SOURCE_ROWS = "source_rows"


def refuse_reordered(batch: Batch, what: str) -> None:
    """Refuse a batch of rows out of their data set's order (SOURCE_ROWS): `what` returns its rows in batch order."""
    if SOURCE_ROWS in batch:
        raise ValueError(f"{what} got batches grouped by length (iterate_batches(..., by_length=True)): its results "
                         "would be in the sorted order, not the data set's; batch these data with by_length=False")


def row_count(batch: Batch) -> int:
    """Number of rows (sequences) of a batch, or of a whole data set given as a dict of (N, ...) tensors: the first
    dimension of input_ids if present, else of the first tensor with a dimension."""
    ids = batch.get("input_ids")
    if isinstance(ids, torch.Tensor):
        return int(ids.shape[0])
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError(f"batch has no tensors to count rows in (keys: {sorted(batch)})")


def sequence_shape(batch: Batch) -> tuple[int, int] | None:
    """(B, T) of a batch of token sequences (from a 2-D input_ids), None for other batches."""
    ids = batch.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        return int(ids.shape[0]), int(ids.shape[1])
    return None


def check_nonempty(batch: Batch, index: int, what: str) -> None:
    """Refuse a batch of zero rows (transformers fails on it with an unrelated reshape error)."""
    if row_count(batch) == 0:
        raise ValueError(f"{what} batch {index} has 0 rows; drop empty batches before passing them")


def refuse_one_shot(batches: Iterable, what: str) -> None:
    """Refuse an iterator (e.g. a generator), which a second pass would find empty."""
    if iter(batches) is batches:
        raise TypeError(f"{what} got a one-shot iterator ({type(batches).__name__}) but iterates the batches more "
                        "than once; pass a list or a re-iterable (e.g. a DataLoader)")


def single_rows(batches: Iterable[Batch]) -> Iterator[Batch]:
    """Every row of every batch as a batch of one (tensors sliced [i : i + 1], other values kept)."""
    for batch in batches:
        for i in range(row_count(batch)):
            yield {k: v[i : i + 1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() inside, the model's own training flag restored after (dropout off while the engine measures)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's (first) parameters (for an FSDP-sharded model, that of its local shard)."""
    return next(model.parameters()).device


def to_device(batch: Batch, model: nn.Module) -> Batch:
    """The batch with every tensor on the device of the model's (first) parameters."""
    device = model_device(model)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype sums and contractions run in: the widest of `dtypes` and float32 (bf16/fp16 -> float32, float64 stays).

    Half-precision outer products and matmul outputs round every partial result to 8 (bf16) or 11 (fp16) bits; the
    covariances, per-sequence gradients and scores are sums over thousands of tokens, so they are upcast first.
    """
    result = torch.float32
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result


def upcast(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """t in `dtype` (default: accumulation_dtype(t.dtype)); t itself when it already is (no copy)."""
    return t.to(dtype or accumulation_dtype(t.dtype))


def check_finite(t: torch.Tensor, what: str) -> None:
    """Refuse a tensor with a NaN or inf, naming what it is."""
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(f"{what} contains NaN or inf; check the model's outputs and the input data")


def token_weights(task: "Task", batch: Batch, activation: torch.Tensor) -> torch.Tensor:
    """(B, T, 1) float mask of real input tokens (task.token_mask; all ones without one), aligned with the captured
    activations a (B, T, d_in), in a's device and dtype."""
    mask = task.token_mask(batch)
    if mask is None:
        return activation.new_ones(*activation.shape[:2], 1)
    return mask.to(activation.device, activation.dtype).reshape(*activation.shape[:2], 1)


def real_token_activations(task: "Task", batch: Batch, activation: torch.Tensor) -> torch.Tensor:
    """a (B, T, d_in) with padding tokens zeroed; a itself, not a masked copy, when every token is real."""
    mask = task.token_mask(batch)
    if mask is None or bool(mask.all()):
        return activation
    return activation * token_weights(task, batch, activation)


def return_freed_host_memory() -> bool:
    """Hand the pages the C allocator holds for freed tensors back to the operating system (glibc's malloc_trim(0));
    False where there is no glibc. Query batches free their per-batch temporaries (gradients, rotations: tens of MB
    each) between batches, and glibc, whose mmap threshold rises to the size of the largest freed chunk, keeps them in
    its heap: on gpt2_m with Q = 128 the process held 0.54 GB above the 0.26 GB of preconditioned queries after
    `query_gradients` (benchmarks/peers, issue 19 item 5). Costs well under a millisecond per call here."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM is False:
        return False
    _MALLOC_TRIM(0)
    return True


_MALLOC_TRIM = None
