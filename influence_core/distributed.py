"""Data parallelism over torch.distributed: `torchrun --nproc_per_node N python -m experiments.score ...`.

Work is split by index: batch (or shard) i belongs to rank i mod N. Factor fitting all-reduces its running sums
and counts, so every rank ends with the same factors; scoring writes each rank's shards to a shared directory.
Without an initialised process group every helper falls back to a single process (rank 0 of 1).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def owns(index: int) -> bool:
    """True when item `index` (a batch or a shard) is this rank's: index mod world_size == rank."""
    return index % world_size() == rank()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each tensor over ranks, in place (on the backend's device: CUDA for NCCL); returns the dict."""
    if not is_distributed():
        return tensors
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    for key, value in tensors.items():
        moved = value.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        tensors[key] = moved.to(value.device) if moved is not value else moved
    return tensors


def init_from_environment(backend: str | None = None, timeout_s: float = 1800) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...); no-op without it.

    Backend: NCCL when CUDA is available, else gloo. Returns True when running distributed.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return True


def device_for_rank() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
