"""A compressed gradient index: every training sequence's gradient stored once, new queries answered from it.

Per tracked layer l, with D_n = sum_t g_t a_t^T the training gradient of sequence n (d_out, d_in) and
q' = (G_l + lambda I)^{-1} q the EK-FAC-preconditioned query (scores.py), influence is I = sum_l <q'_l, D_n,l>.
The index keeps, per layer, two bases M_out (d_out, k_out) and M_in (d_in, k_in) and stores

    C_n = M_out^T D_n M_in = sum_t (M_out^T g_t)(M_in^T a_t)^T          (k_out, k_in) per sequence and layer

computed from projected tokens (T (d_out k_out + d_in k_in + k_out k_in) multiply-adds, no D_n formed). A query is
scored as  I_index = sum_l <M_out^T q'_l M_in, C_n,l>, one (N, K) x (K, Q) product over the stored rows.

Projections (IndexArguments.projection):
- "eigen": M = the eigenvectors of the EK-FAC factors (Q_S, Q_A) with the largest share of the preconditioned score,
  importance of output direction i = sum_j Lambda_ij / (Lambda_ij + lambda) (the expected weight of entry (i, j)
  in <q', D_n>), of input direction j the same summed over i. Then M_out^T q' M_in = R_q / (Lambda + lambda) on the
  kept k_out x k_in block of the eigenbasis (R_q = Q_S^T q Q_A): EK-FAC preconditioning in the compressed space,
  exact on that block. With k = d the index reproduces exact EK-FAC (tests/test_index.py).
- "random": M = G / sqrt(k), G standard normal (LoGra / TRAK's random projection of activations and output
  gradients); E[M M^T] = I, so the inner product is kept in expectation (Johnson-Lindenstrauss).

On disk (`output_dir`): manifest.json (what the index was built from: model and layer fingerprints, factor identity
and damping, projection, data fingerprint, N), bases.safetensors, and shard_<i>.npy, (rows, K) in `dtype`, each
written atomically, so a killed build resumes at the first missing shard. Queries read the shards as numpy memmaps,
shard by shard: no model pass over the training set, and N is bounded by disk, not memory.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import (Factors, ScoreArguments, TrackedLayer, compute_scores, iterate_batches, model_fingerprint,
               per_sequence_gradients, query_gradients)
from .batch import (Batch, accumulation_dtype, check_finite, check_nonempty, real_token_activations,
                    refuse_reordered, to_device, upcast)
from .sharding import _data_fingerprint
from .task import Task, trim_padding
from .tracking import LayerCapture, layer_fingerprints, tracked_parameters_require_grad

INDEX_FORMAT_VERSION = 1
PROJECTIONS = ("eigen", "random")
STORAGE_DTYPES = ("float16", "float32", "float64")


class IndexMismatchError(ValueError):
    """An index folder was built from another model, factors, data or settings."""


@dataclass
class IndexArguments:
    """How the index is built. Dimensions per layer, capped at the layer's own (None: the full dimension)."""

    projection: Literal["eigen", "random"] = "eigen"  # eigen: top EK-FAC directions; random: Gaussian (LoGra)
    output_dim: int | None = 32  # k_out, kept output-gradient directions per layer
    input_dim: int | None = 32  # k_in, kept activation directions per layer (the bias coordinate included)
    shard_size: int = 4096  # training sequences per shard file
    batch_size: int = 16  # training sequences per forward/backward pass
    dtype: str = "float32"  # storage dtype of the compressed gradients: float16 halves the disk
    seed: int = 0  # of the random projection
    progress: bool = True

    def __post_init__(self) -> None:
        if self.projection not in PROJECTIONS:
            raise ValueError(f"unknown projection {self.projection!r}; choose one of {PROJECTIONS}")
        for name in ("output_dim", "input_dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"IndexArguments.{name}={value!r}: give an integer >= 1, or None for the full dimension")
        for name in ("shard_size", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"IndexArguments.{name}={value!r}: give an integer >= 1")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"IndexArguments.dtype={self.dtype!r}: choose one of {STORAGE_DTYPES}")

    def identity(self) -> dict:
        """The settings that change the stored numbers (progress and batch size do not)."""
        return {k: v for k, v in asdict(self).items() if k not in ("progress", "batch_size")}


# ------------------------------------------------------------------------------------------------ bases


def index_bases(layers: Sequence[TrackedLayer], factors: Factors, args: IndexArguments) -> dict[str, torch.Tensor]:
    """{'<layer>.output_basis': M_out (d_out, k_out), '<layer>.input_basis': M_in (d_in, k_in)} in the factors' dtype."""
    out = {}
    for position, layer in enumerate(layers):
        lf = factors.layers[layer.name]
        d_out, d_in = layer.out_features, layer.input_dim
        k_out, k_in = min(args.output_dim or d_out, d_out), min(args.input_dim or d_in, d_in)
        dtype = lf.eigenvalues.dtype if lf.eigenvalues is not None else torch.float32
        if args.projection == "random":
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + position)
            m_out = torch.randn(d_out, k_out, generator=generator, dtype=torch.float64) / k_out ** 0.5
            m_in = torch.randn(d_in, k_in, generator=generator, dtype=torch.float64) / k_in ** 0.5
        else:
            q_s = lf.gradient_eigenvectors if lf.gradient_eigenvectors is not None else torch.eye(d_out, dtype=dtype)
            q_a = lf.activation_eigenvectors if lf.activation_eigenvectors is not None else torch.eye(d_in, dtype=dtype)
            if lf.eigenvalues is not None:
                eigenvalues = lf.eigenvalues.double()
                weight = eigenvalues / (eigenvalues + factors.damping_for(layer.name))  # share of entry (i, j)
                weight = torch.nan_to_num(weight)  # 0 / 0 with zero damping on an empty direction
            else:
                weight = torch.ones(d_out, d_in, dtype=torch.float64)
            keep_out = torch.argsort(weight.sum(1), descending=True, stable=True)[:k_out]
            keep_in = torch.argsort(weight.sum(0), descending=True, stable=True)[:k_in]
            m_out, m_in = q_s[:, keep_out], q_a[:, keep_in]
        out[f"{layer.name}.output_basis"] = m_out.to(dtype).contiguous()
        out[f"{layer.name}.input_basis"] = m_in.to(dtype).contiguous()
    return out


def project_tokens_first(tokens: int, d_out: int, d_in: int, k_out: int, k_in: int) -> bool:
    """Whether (M_out^T g_t)(M_in^T a_t)^T summed over tokens, T (d_out k_out + d_in k_in + k_out k_in) multiply-adds
    per sequence, is cheaper than D_n first, T d_out d_in, then M_out^T D_n M_in, d_out d_in k_in + d_out k_in k_out."""
    first = tokens * (d_out * k_out + d_in * k_in + k_out * k_in)
    return first < tokens * d_out * d_in + d_out * d_in * k_in + d_out * k_in * k_out


def compress(m_out: torch.Tensor, m_in: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """M_out^T X M_in for X (..., d_out, d_in) -> (..., k_out, k_in)."""
    return m_out.T @ matrices @ m_in


# ------------------------------------------------------------------------------------------------ the index


class GradientIndex:
    """An index folder opened for queries: its bases, and its shards as numpy memmaps."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        manifest_path = self.directory / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(f"no gradient index in {self.directory} (no manifest.json); build one with "
                                    "`influence-lab index build` or influence_core.index.build_index")
        self.manifest = json.loads(manifest_path.read_text())
        missing = [i for i in range(self.num_shards) if not shard_path(self.directory, i).exists()]
        if missing:
            raise IndexMismatchError(
                f"the index in {self.directory} is incomplete: {len(missing)} of {self.num_shards} shards missing "
                f"(first: {shard_path(self.directory, missing[0]).name}); rerun the same build to finish it")
        self.bases = load_file(str(self.directory / "bases.safetensors"))

    @property
    def layer_names(self) -> list[str]:
        return list(self.manifest["layer_names"])

    @property
    def num_sequences(self) -> int:
        return int(self.manifest["num_sequences"])

    @property
    def num_shards(self) -> int:
        return -(-self.num_sequences // int(self.manifest["arguments"]["shard_size"]))

    @property
    def width(self) -> int:
        """K = sum_l k_out,l k_in,l, the stored numbers per sequence."""
        return int(self.manifest["width"])

    @property
    def bytes_per_sequence(self) -> int:
        return self.width * np.dtype(self.manifest["arguments"]["dtype"]).itemsize

    def shard(self, i: int) -> np.ndarray:
        return np.load(shard_path(self.directory, i), mmap_mode="r")

    def check_layers(self, layers: Sequence[TrackedLayer]) -> None:
        """Refuse layers (names, or weights by fingerprint) other than those the index was built on."""
        names = [l.name for l in layers]
        if names != self.layer_names:
            raise IndexMismatchError(f"the index was built on layers {self.layer_names}, these are {names}; track the "
                                     "same layers")
        for name, value in layer_fingerprints(layers).items():
            saved = self.manifest["layer_fingerprints"].get(name)
            if saved != value:
                raise IndexMismatchError(f"the index was built on a model whose layer '{name}' has fingerprint "
                                         f"{saved}, this model's is {value}: rebuild the index on this model")

    def project_queries(self, preconditioned: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(Q, K): per layer M_out^T q'_l M_in flattened, layers side by side (the order of the stored rows)."""
        parts = []
        for name in self.layer_names:
            q = preconditioned[name]
            m_out, m_in = self.bases[f"{name}.output_basis"], self.bases[f"{name}.input_basis"]
            dtype = accumulation_dtype(q.dtype, m_out.dtype)
            parts.append(compress(m_out.to(dtype), m_in.to(dtype), q.to(dtype)).reshape(q.shape[0], -1))
        return torch.cat(parts, dim=1)

    def scores(self, projected_queries: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """(Q, N) index scores <projected query, C_n>, shard by shard and `chunk` rows at a time (bounded memory)."""
        projected = projected_queries.T.contiguous()  # (K, Q)
        parts = []
        for i in range(self.num_shards):
            rows = self.shard(i)
            for start in range(0, len(rows), chunk):
                # the memmap itself where the dtypes agree (8x faster than a copy; it is only read), else upcast
                block = np.asarray(rows[start:start + chunk], dtype=_numpy_dtype(projected.dtype))
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    parts.append(torch.from_numpy(block) @ projected)
        return torch.cat(parts).T.contiguous()


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(str(dtype).removeprefix("torch."))


def shard_path(directory: Path, index: int) -> Path:
    return Path(directory) / f"shard_{index:06d}.npy"


# ------------------------------------------------------------------------------------------------ build


def build_index(model: nn.Module, layers: Sequence[TrackedLayer], task: Task, train: Mapping[str, torch.Tensor],
                factors: Factors, output_dir: str | Path, args: IndexArguments | None = None,
                run_identity: dict | None = None) -> GradientIndex:
    """Store every row of `train` (dict of (N, ...) tensors the task reads) compressed, shard by shard.

    One forward + backward per batch (output gradients only, as in scoring); shards already written by an
    identical earlier build are kept. run_identity: extra settings (e.g. where the data came from) that must match.
    Returns the opened index. Raises IndexMismatchError for a folder built from anything else.
    """
    args = args or IndexArguments()
    layers = list(layers)
    factors.check_layers(layers)
    directory = Path(output_dir)
    num_rows = len(next(iter(train.values())))
    if num_rows == 0:
        raise ValueError("the training data is empty: no sequences to index")
    bases = index_bases(layers, factors, args)
    dims = {l.name: [bases[f"{l.name}.output_basis"].shape[1], bases[f"{l.name}.input_basis"].shape[1]] for l in layers}
    identity = {
        "format_version": INDEX_FORMAT_VERSION, "model_fingerprint": model_fingerprint(layers),
        "layer_names": [l.name for l in layers], "layer_fingerprints": layer_fingerprints(layers),
        "factors": {k: factors.manifest.get(k) for k in ("strategy", "fisher", "seed", "dtype", "model_fingerprint",
                                                         "data_fingerprint")},
        "damping": {l.name: factors.damping_for(l.name) for l in layers},
        "arguments": args.identity(), "data_fingerprint": _data_fingerprint(train, np.arange(num_rows)),
        "num_sequences": num_rows, "dimensions": dims, "width": sum(a * b for a, b in dims.values()),
        "run": run_identity,
    }
    _open_folder(directory, identity, bases)
    num_shards = -(-num_rows // args.shard_size)
    missing = [i for i in range(num_shards) if not _readable(shard_path(directory, i))]
    storage = np.dtype(args.dtype)
    start_time = time.perf_counter()
    for index in tqdm(missing, desc="index shards", disable=not args.progress, leave=False):
        start, stop = index * args.shard_size, min(num_rows, (index + 1) * args.shard_size)
        rows = {k: v[start:stop] for k, v in train.items()}
        compressed = compressed_gradients(model, layers, task, iterate_batches(rows, args.batch_size), bases)
        _write_shard(compressed.numpy().astype(storage, copy=False), shard_path(directory, index))
    manifest = {**identity, "built_shards_last_run": len(missing),
                "build_s_last_run": time.perf_counter() - start_time}
    _write_json(manifest, directory / "manifest.json")
    return GradientIndex(directory)


def compressed_gradients(model: nn.Module, layers: Sequence[TrackedLayer], task: Task, batches: Iterable[Batch],
                         bases: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(N, K): per training sequence and layer C_n = M_out^T D_n M_in flattened, layers side by side."""
    parts = []
    was_training = model.training
    model.eval()
    try:
        with tracked_parameters_require_grad(layers), LayerCapture(layers) as capture:
            for index, batch in enumerate(batches):
                check_nonempty(batch, index, "training")
                refuse_reordered(batch, "the gradient index")
                batch, _ = trim_padding(to_device(batch, model))
                capture.clear(batch)
                loss = task.training_loss(model, batch)
                check_finite(loss, "training loss")
                grads = capture.output_gradients(loss)
                row = []
                for layer in layers:
                    m_out, m_in = bases[f"{layer.name}.output_basis"], bases[f"{layer.name}.input_basis"]
                    dtype = accumulation_dtype(capture.activations[layer.name].dtype, m_out.dtype)
                    m_out, m_in = m_out.to(grads[layer.name].device, dtype), m_in.to(grads[layer.name].device, dtype)
                    a = real_token_activations(task, batch, upcast(capture.activations[layer.name], dtype))
                    g = upcast(grads[layer.name], dtype)
                    if project_tokens_first(a.shape[1], layer.out_features, layer.input_dim, m_out.shape[1],
                                            m_in.shape[1]):
                        c = per_sequence_gradients(a @ m_in, g @ m_out)  # (B, k_out, k_in)
                    else:
                        c = compress(m_out, m_in, per_sequence_gradients(a, g))
                    row.append(c.reshape(c.shape[0], -1))
                stacked = torch.cat(row, dim=1)
                check_finite(stacked, "compressed training gradients")
                parts.append(stacked.cpu())
    finally:
        model.train(was_training)
    return torch.cat(parts)


# ------------------------------------------------------------------------------------------------ query


def query_index(model: nn.Module, layers: Sequence[TrackedLayer], task: Task, query_batches: Iterable[Batch],
                factors: Factors, index: GradientIndex, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """Index scores (Q, N) of new queries: their preconditioned gradients (one pass over the queries only),
    projected, against every stored row. Returns (scores, preconditioned queries) so a re-rank can reuse the latter.
    """
    index.check_layers(layers)
    preconditioned = query_gradients(model, layers, task, query_batches, progress=progress, factors=factors)
    return index.scores(index.project_queries(preconditioned)), preconditioned


def rerank(model: nn.Module, layers: Sequence[TrackedLayer], task: Task, train: Mapping[str, torch.Tensor],
           preconditioned: Mapping[str, torch.Tensor], index_scores: torch.Tensor, candidates: int,
           batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact EK-FAC scores of each query's `candidates` best rows by the index (compute_scores over their union,
    reading only those rows of `train`). Returns (rows (Q, k), exact scores (Q, k)), each query's rows sorted by
    exact score, best first."""
    k = min(candidates, index_scores.shape[1])
    top = torch.topk(index_scores, k, dim=1).indices  # (Q, k)
    union, inverse = torch.unique(top, return_inverse=True)
    subset = {key: value[union] for key, value in train.items()}
    exact = compute_scores(model, layers, task, iterate_batches(subset, batch_size), preconditioned,
                           args=ScoreArguments(progress=False)).total  # (Q, |union|)
    chosen = torch.gather(exact, 1, inverse)  # (Q, k)
    order = torch.argsort(chosen, dim=1, descending=True)
    return torch.gather(top, 1, order), torch.gather(chosen, 1, order)


# ------------------------------------------------------------------------------------------------ files


def _open_folder(directory: Path, identity: dict, bases: dict[str, torch.Tensor]) -> None:
    """Create the folder with its manifest and bases, or check that an existing one was built the same way."""
    manifest = directory / "manifest.json"
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        for key, value in identity.items():
            if json.loads(json.dumps(saved.get(key), default=str)) != json.loads(json.dumps(value, default=str)):
                raise IndexMismatchError(
                    f"the index in {directory} was built with {key}={saved.get(key)!r}, this build has "
                    f"{key}={value!r}; use another folder or delete the old index")
        return
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "bases.safetensors.tmp"
    save_file(bases, str(tmp))
    os.replace(tmp, directory / "bases.safetensors")
    _write_json(identity, manifest)


def _readable(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        np.load(path, mmap_mode="r")
        return True
    except (ValueError, OSError):
        return False


def _write_shard(rows: np.ndarray, path: Path) -> None:
    tmp = path.with_suffix(".npy.tmp")
    with open(tmp, "wb") as f:
        np.save(f, rows)
    os.replace(tmp, path)


def _write_json(data: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)
