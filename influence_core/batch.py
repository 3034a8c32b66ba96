"""Small helpers on batches (dicts of tensors whose first dimension is the row, i.e. sequence, index)."""

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


def to_device(batch: Batch, model: nn.Module) -> Batch:
    """The batch with every tensor on the device of the model's (first) parameters."""
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def check_finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(f"{what} contains NaN or inf; check the model's outputs and the input data")
