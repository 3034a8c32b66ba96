"""Data parallelism over torch.distributed: `torchrun --nproc_per_node N python -m experiments.score ...`.

Work is split by index: batch (or shard) i belongs to rank i mod N. Factor fitting all-reduces its running sums
and counts, so every rank ends with the same factors; scoring writes each rank's shards to a shared directory.
Without an initialised process group every helper falls back to a single process (rank 0 of 1).

Models that do not fit one device: `shard_model` shards the weights over the ranks with torch's FSDP2
(`torch.distributed.fsdp.fully_shard`). Each forward and backward all-gathers a block's weights, so the tracked
layers' hooks see the whole weight's inputs and outputs; activations and output gradients stay per rank, as in
data parallelism, and nothing else in the engine changes. Two things do: every rank must run as many forward
passes as the others (each one is a collective), so a rank with fewer batches repeats one and discards it
(`padding_rounds`); and the fingerprint of a sharded weight is taken of the whole weight (`full_tensor`).
Track the layers before sharding, so their shapes are the unsharded ones.
"""

from __future__ import annotations

import os
import weakref
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
    device = _reduce_device()
    for key, value in tensors.items():
        moved = value.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        tensors[key] = moved.to(value.device) if moved is not value else moved
    return tensors


def _reduce_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 (`fully_shard`) shards the model's weights over ranks: its parameters are DTensors.

    Raises TypeError for the older FullyShardedDataParallel wrapper, whose flattened weights the engine cannot
    fingerprint or hook by layer.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise TypeError("the model is wrapped in FullyShardedDataParallel (FSDP1), whose flattened weights the engine "
                        "cannot fingerprint; shard it with influence_core.distributed.shard_model (fully_shard, FSDP2)")
    return any(isinstance(p, DTensor) for p in model.parameters())


def padding_rounds(model: torch.nn.Module, passes: int) -> int:
    """Forward passes this rank must add to its own `passes` so that it runs as many as the busiest rank: 0 unless
    the model is sharded (then every forward and backward is a collective, and a missing one hangs the others).

    A collective itself: every rank calls it, with its own count, before its first forward pass.
    """
    if not is_distributed() or not is_sharded(model):
        return 0
    count = torch.tensor([passes], dtype=torch.long, device=_reduce_device())
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count) - passes


_SHARDED_SAMPLES: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}  # id(weight) -> (weight, version, sample)


def weight_sample(weight: torch.Tensor, size: int = 4096) -> torch.Tensor:
    """A strided sample of about `size` entries of the flattened weight, float64 on the CPU (for fingerprints).

    For an FSDP2 shard (a DTensor) it is the sample of the whole weight, the same on every rank: gathered once (a
    collective, which every rank reaches at the same point) and kept while the local shard is unchanged (its version
    counter), so the checks that fingerprint the model before every pass and shard do not all-gather it again.
    """
    local = weight.to_local() if hasattr(weight, "to_local") else None
    if local is not None:
        ref, version, sample = _SHARDED_SAMPLES.get(id(weight), (None, None, None))
        if ref is not None and ref() is weight and version == local._version:
            return sample
    full = weight.detach().full_tensor() if local is not None else weight.detach()
    flat = full.reshape(-1)
    sample = flat[:: max(1, flat.numel() // size)].to(torch.float64).cpu()
    if local is not None:
        key = id(weight)
        _SHARDED_SAMPLES[key] = (weakref.ref(weight, lambda _: _SHARDED_SAMPLES.pop(key, None)), local._version, sample)
    return sample


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The elements of the model's longest nn.ModuleList (gpt_neox.layers, model.layers, transformer.h ...)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard_model(model: torch.nn.Module, blocks: list[torch.nn.Module] | None = None,
                **fully_shard_options) -> torch.nn.Module:
    """Shard the model's weights over all ranks with FSDP2: `fully_shard` each block, then the whole model.

    blocks: the units whose weights are gathered together (default: `transformer_blocks(model)`); options go to
    `fully_shard` (e.g. reshard_after_forward=False keeps a block's weights gathered from forward to backward,
    mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16) runs fp32 weights in bf16). Modules keep their
    identity, so layers tracked before sharding (with their unsharded shapes) stay valid. Returns the model.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not is_distributed():
        raise RuntimeError("shard_model needs an initialised process group (torchrun, or dist.init_process_group)")
    device_type = next(model.parameters()).device.type
    mesh = init_device_mesh(device_type, (world_size(),))
    for block in transformer_blocks(model) if blocks is None else blocks:
        fully_shard(block, mesh=mesh, **fully_shard_options)
    fully_shard(model, mesh=mesh, **fully_shard_options)
    return model


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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A device setting -> torch.device: "auto" (or None) is cuda:LOCAL_RANK when CUDA is available, else cpu;
    "cpu", "cuda", "cuda:N" are taken as given, "cuda" refused (one line, with the fix) where CUDA is missing."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return device_for_rank()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a device; use cpu, cuda, cuda:N or auto") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here (torch {torch.__version__}); use "
                         "device=cpu, or device=auto to take CUDA only where it exists")
    return resolved
