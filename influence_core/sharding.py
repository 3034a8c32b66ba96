"""Streaming scores: one query set over a training set too large for one pass, in resumable shards.

The training sequences are cut into shards of `shard_size` consecutive rows. Each finished shard is written
atomically (parquet to a temporary name, then `os.replace`) as `shard_<index>.parquet` with one row per scored
(query, training sequence) pair:

    query | train_id | score | layer:<module path> ... | token_scores (list, only for the shard's top sequences)

so a killed run restarts at the first missing shard, and a shard file is either complete or absent.
`manifest.json` records what the shards were computed from (model, layers, queries, data, settings); a rerun
into the same folder with anything else is refused. Under torch.distributed shard i is scored by rank
i mod N, all ranks writing into the same (shared) folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .batch import row_count
from .factors.stages import read_json
from .lowrank import LowRankQuery
from .scores import ScoreArguments, compute_scores
from .task import Task, iterate_batches
from .tracking import TrackedLayer, model_fingerprint

SHARD_FORMAT_VERSION = 1


class ShardMismatchError(ValueError):
    """A shard folder was written by another run (model, queries, data or settings)."""


@dataclass
class ShardArguments:
    shard_size: int = 1024  # training sequences per shard file
    batch_size: int = 8  # training sequences per forward/backward pass
    top_k_tokens: int = 10  # token-wise scores kept per query and shard for its k highest-scoring sequences (0: none)

    def __post_init__(self) -> None:
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError(f"shard_size and batch_size must be >= 1, got {self.shard_size} and {self.batch_size}")
        if self.top_k_tokens < 0:
            raise ValueError(f"top_k_tokens must be >= 0, got {self.top_k_tokens}")


def shard_path(directory: Path, index: int) -> Path:
    return Path(directory) / f"shard_{index:06d}.parquet"


def score_in_shards(model: nn.Module, layers: Sequence[TrackedLayer], task: Task, train: Mapping[str, torch.Tensor],
                    preconditioned_queries: Mapping[str, torch.Tensor | LowRankQuery], query_names: Sequence[str],
                    output_dir: str | Path, shard_args: ShardArguments | None = None,
                    score_args: ScoreArguments | None = None, train_ids: Sequence[int] | None = None,
                    candidates: Mapping[str, Sequence[int]] | None = None, run_identity: dict | None = None) -> Path:
    """Score every query against the training rows of `train` (dict of (N, ...) tensors the task reads), shard by
    shard into `output_dir`, skipping shards already written. Returns the folder; read it with `read_scores`.

    train_ids: the id written for each row (default 0..N-1). candidates: query name -> row indices to score
    (e.g. from the TF-IDF filter); other pairs are not scored, and rows no query needs are skipped.
    run_identity: extra settings (e.g. the resolved config) that must match for a rerun to reuse the shards.
    """
    shard_args = shard_args or ShardArguments()
    score_args = score_args or ScoreArguments()
    directory = Path(output_dir)
    query_names = list(query_names)
    num_rows = row_count(train)
    if num_rows == 0:
        raise ValueError("the training data is empty: no sequences to score")
    train_ids = np.arange(num_rows) if train_ids is None else np.asarray(train_ids, dtype=np.int64)
    if len(train_ids) != num_rows:
        raise ValueError(f"{len(train_ids)} train_ids for {num_rows} training rows")
    allowed = _candidate_mask(candidates, query_names, num_rows)
    num_shards = -(-num_rows // shard_args.shard_size)
    identity = {
        "format_version": SHARD_FORMAT_VERSION, "model_fingerprint": model_fingerprint(layers),
        "layer_names": [l.name for l in layers], "query_names": query_names,
        "query_checksum": _query_checksum(preconditioned_queries, [l.name for l in layers]),
        "data_fingerprint": _data_fingerprint(train, train_ids), "num_sequences": num_rows,
        "shard_size": shard_args.shard_size, "top_k_tokens": shard_args.top_k_tokens,
        "query_rank": score_args.query_rank, "low_rank": score_args.low_rank,
        "candidates": None if allowed is None else hashlib.sha256(np.packbits(allowed).tobytes()).hexdigest()[:16],
        "run": run_identity,
    }
    _open_folder(directory, identity, num_shards)

    mine = [i for i in range(num_shards) if distributed.owns(i) and not _readable_shard(shard_path(directory, i))]
    per_token = shard_args.top_k_tokens > 0
    args = ScoreArguments(**{**asdict(score_args), "per_token": per_token, "progress": False})
    work = {}
    for index in mine:
        start, stop = index * shard_args.shard_size, min(num_rows, (index + 1) * shard_args.shard_size)
        rows = np.arange(start, stop)
        work[index] = rows if allowed is None else rows[allowed[:, start:stop].any(axis=0)]
    # a model sharded over the ranks (FSDP) needs as many forward passes on every rank: the others' missing ones
    # are run on one row and discarded
    extra = distributed.padding_rounds(model, sum(-(-len(n) // shard_args.batch_size) for n in work.values()))
    bar = tqdm(mine, desc=f"score shards (rank {distributed.rank()})", disable=not score_args.progress, leave=False)
    for index in bar:
        needed = work[index]
        table = _empty_table([l.name for l in layers])
        if len(needed):
            chosen = torch.as_tensor(needed)
            batches = iterate_batches({k: v[chosen] for k, v in train.items()}, shard_args.batch_size)
            scores = compute_scores(model, layers, task, batches, preconditioned_queries, query_names, args)
            table = _shard_table(scores, needed, train_ids, allowed, train, shard_args.top_k_tokens)
        _write_atomic(table, shard_path(directory, index))
    if extra:
        filler = {k: v[:1] for k, v in train.items()}
        compute_scores(model, layers, task, [filler] * extra, preconditioned_queries, query_names, args)
    distributed.barrier()
    return directory


def read_scores(output_dir: str | Path, require_complete: bool = True) -> pd.DataFrame:
    """All shard rows of a folder as one DataFrame (query, train_id, score, layer:<name>..., token_scores)."""
    directory = Path(output_dir)
    manifest_path = directory / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"no shard manifest in {directory}; run score_in_shards first")
    manifest = read_json(manifest_path)
    paths = [shard_path(directory, i) for i in range(manifest["num_shards"])]
    missing = [p.name for p in paths if not p.exists()]
    if missing and require_complete:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} shards missing in {directory} (first: {missing[0]}); "
                                "rerun the same command to finish them")
    frames = [_read_shard(p).to_pandas() for p in paths if p.exists()]
    return pd.concat(frames, ignore_index=True) if frames else _empty_table(manifest["layer_names"]).to_pandas()


def scores_matrix(frame: pd.DataFrame, query_names: Sequence[str], num_sequences: int,
                  column: str = "score") -> torch.Tensor:
    """(Q, N) float64 tensor of one score column, NaN where a pair was not scored (filtered out)."""
    out = torch.full((len(query_names), num_sequences), float("nan"), dtype=torch.float64)
    rows = {name: i for i, name in enumerate(query_names)}
    q = torch.as_tensor(np.array(frame["query"].map(rows), dtype=np.int64))
    n = torch.as_tensor(np.array(frame["train_id"], dtype=np.int64))
    out[q, n] = torch.as_tensor(np.array(frame[column], dtype=np.float64))
    return out


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _open_folder(directory: Path, identity: dict, num_shards: int) -> None:
    """Check or write the manifest (rank 0 writes); clear temporary files a killed run left behind."""
    manifest_path = directory / "manifest.json"
    if manifest_path.exists():
        saved = read_json(manifest_path)
        for key, value in identity.items():
            if json.loads(json.dumps(saved.get("identity", {}).get(key), default=str)) != \
                    json.loads(json.dumps(value, default=str)):
                raise ShardMismatchError(
                    f"shards in {directory} were computed with {key}={saved['identity'].get(key)!r}, this run has "
                    f"{key}={value!r}; use another output folder or delete the old one")
    distributed.barrier()
    if distributed.is_main():
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.tmp"):
            stale.unlink(missing_ok=True)  # a shard being written when the run was killed: recomputed below
        if not manifest_path.exists():
            tmp = manifest_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({"identity": identity, "num_shards": num_shards, "layer_names":
                                       identity["layer_names"], "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                                       "torch_version": torch.__version__}, indent=2, default=str))
            os.replace(tmp, manifest_path)
    distributed.barrier()


def _readable_shard(path: Path) -> bool:
    """Whether a finished shard file is there and intact; a damaged one (e.g. truncated) is reported, to be recomputed."""
    if not path.exists():
        return False
    try:
        pq.ParquetFile(path).metadata  # reads the footer: a truncated file has none
        return True
    except Exception as error:
        print(f"warning: shard {path} is damaged ({error}); recomputing it", flush=True)
        return False


def _read_shard(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except Exception as error:
        raise ValueError(f"shard {path} is damaged ({error}); rerun the same score_in_shards command to recompute "
                         "it") from error


def _candidate_mask(candidates, query_names, num_rows) -> np.ndarray | None:
    """(Q, N) bool: which pairs to score; None scores everything."""
    if candidates is None:
        return None
    unknown = sorted(set(candidates) - set(query_names))
    if unknown:
        raise ValueError(f"candidates given for unknown queries {unknown}; queries are {query_names}")
    mask = np.zeros((len(query_names), num_rows), dtype=bool)
    for q, name in enumerate(query_names):
        rows = np.asarray(list(candidates.get(name, [])), dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= num_rows):
            raise ValueError(f"candidate rows of query '{name}' fall outside 0..{num_rows - 1}")
        mask[q, rows] = True
    return mask


def _query_checksum(queries, names) -> list[str]:
    """Per layer the norm of each preconditioned query, to 4 significant digits (stable under float noise)."""
    out = []
    for name in names:
        q = queries[name]
        dense_norms = (q.left @ q.right if isinstance(q, LowRankQuery) else q).flatten(1).norm(dim=1)
        out.append(",".join(f"{float(v):.3e}" for v in dense_norms))
    return out


def _data_fingerprint(train: Mapping[str, torch.Tensor], train_ids: np.ndarray) -> str:
    digest = hashlib.sha256(train_ids.tobytes())
    for key in sorted(train):
        value = train[key]
        if isinstance(value, torch.Tensor):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _schema(layer_names: Sequence[str]) -> pa.Schema:
    fields = [pa.field("query", pa.string()), pa.field("train_id", pa.int64()), pa.field("score", pa.float64())]
    fields += [pa.field(f"layer:{name}", pa.float64()) for name in layer_names]
    fields.append(pa.field("token_scores", pa.list_(pa.float64())))
    return pa.schema(fields)


def _empty_table(layer_names: Sequence[str]) -> pa.Table:
    return _schema(layer_names).empty_table()


def _shard_table(scores, rows: np.ndarray, train_ids: np.ndarray, allowed: np.ndarray | None,
                 train: Mapping[str, torch.Tensor], top_k_tokens: int) -> pa.Table:
    """Rows of one shard: every allowed (query, sequence) pair; token scores for each query's top sequences."""
    total = scores.total.double().numpy()  # (Q, n)
    per_layer = scores.per_layer.double().numpy()  # (Q, n, L)
    lengths = None
    if "attention_mask" in train:
        lengths = train["attention_mask"][torch.as_tensor(rows)].sum(dim=1).numpy()
    columns = {"query": [], "train_id": [], "score": [], "token_scores": []}
    layer_columns = [[] for _ in scores.layer_names]
    for q, name in enumerate(scores.query_names):
        keep = np.ones(len(rows), dtype=bool) if allowed is None else allowed[q, rows]
        kept = np.nonzero(keep)[0]
        top = set(kept[np.argsort(-total[q, kept], kind="stable")[:top_k_tokens]].tolist()) if top_k_tokens else set()
        for j in kept:
            columns["query"].append(name)
            columns["train_id"].append(int(train_ids[rows[j]]))
            columns["score"].append(float(total[q, j]))
            for column, value in zip(layer_columns, per_layer[q, j]):
                column.append(float(value))
            if j in top and scores.per_token is not None:
                width = int(lengths[j]) if lengths is not None else scores.per_token.shape[-1]
                columns["token_scores"].append(scores.per_token[q, j, :width].double().tolist())
            else:
                columns["token_scores"].append(None)
    data = {"query": columns["query"], "train_id": columns["train_id"], "score": columns["score"]}
    data.update({f"layer:{name}": values for name, values in zip(scores.layer_names, layer_columns)})
    data["token_scores"] = columns["token_scores"]
    return pa.table(data, schema=_schema(scores.layer_names))


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.rank{distributed.rank()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
