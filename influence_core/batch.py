"""Small helpers on batches (dicts of tensors whose first dimension is the row, i.e. sequence, index), and the
precision rule of the engine: the model runs in its own dtype (bf16/fp16/fp32), everything the engine sums or
contracts runs in `accumulation_dtype` (float32 at least)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

Batch = Mapping[str, Any]


def row_count(batch: Batch) -> int:
    """Number of rows (sequences) of a batch: the first dimension of its first tensor (input_ids if present)."""
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
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(f"{what} contains NaN or inf; check the model's outputs and the input data")
