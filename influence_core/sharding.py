"""Streaming scores: one query set over a training set too large for one pass, in resumable shards.

Two passes, each cached on its own:

1. The dense pass. The training sequences are cut into shards of `shard_size` consecutive rows; each finished
   shard is written atomically (parquet to a temporary name, then `os.replace`) as `shard_<index>.parquet` with
   one row per scored (query, training sequence) pair:

       query | train_id | score | layer:<module path> ...

   It does not depend on `top_k_tokens` (no token scores are computed here), so every study reads the same shards.

2. The token pass, for `top_k_tokens` = k > 0. Each query's k highest-scoring sequences over all shards (among its
   candidates) are scored again with token-wise influence: the union of those rows, all queries at once, in parts
   of `shard_size` rows written to `tokens_top<k>/shard_<index>.parquet` (query | train_id | token_scores) for the
   pairs in the query's top k. A second study with another k runs only this small pass; the same k, none.

A killed run restarts at the first missing shard or part, and a file is either complete or absent. Each folder's
`manifest.json` records what it was computed from (model, layers, queries, data, settings; for the token folder
also k and the chosen pairs); a rerun into the same folder with anything else is refused. `read_scores(folder, k)`
joins the two: token_scores filled for each query's top k, None elsewhere. Under torch.distributed shard (or part)
i is computed by rank i mod N, all ranks writing into the same (shared) folder; with a sharded model (FSDP) every
rank runs as many forward passes in each pass (`distributed.padding_rounds`).
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

SHARD_FORMAT_VERSION = 2  # 2: dense shards without token scores, which live in tokens_top<k>/ beside them


class ShardMismatchError(ValueError):
    """A shard folder was written by another run (model, queries, data or settings), or in another format."""


@dataclass
class ShardArguments:
    shard_size: int = 1024  # training sequences per shard file (and per part of the token pass)
    batch_size: int = 8  # training sequences per forward/backward pass
    top_k_tokens: int = 10  # token-wise scores for each query's k highest-scoring sequences, all shards (0: none)

    def __post_init__(self) -> None:
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError(f"shard_size and batch_size must be >= 1, got {self.shard_size} and {self.batch_size}")
        if self.top_k_tokens < 0:
            raise ValueError(f"top_k_tokens must be >= 0, got {self.top_k_tokens}")


def shard_path(directory: Path, index: int) -> Path:
    return Path(directory) / f"shard_{index:06d}.parquet"


def token_folder(directory: Path, top_k_tokens: int) -> Path:
    """Where the token pass for k = top_k_tokens keeps its parts, inside the dense shards' folder."""
    return Path(directory) / f"tokens_top{top_k_tokens}"


def score_in_shards(model: nn.Module, layers: Sequence[TrackedLayer], task: Task, train: Mapping[str, torch.Tensor],
                    preconditioned_queries: Mapping[str, torch.Tensor | LowRankQuery], query_names: Sequence[str],
                    output_dir: str | Path, shard_args: ShardArguments | None = None,
                    score_args: ScoreArguments | None = None, train_ids: Sequence[int] | None = None,
                    candidates: Mapping[str, Sequence[int]] | None = None, run_identity: dict | None = None) -> Path:
    """Score every query against the training rows of `train` (dict of (N, ...) tensors the task reads), shard by
    shard into `output_dir`, skipping shards already written; then, for top_k_tokens = k > 0, the token-wise scores
    of each query's k highest-scoring sequences (the token pass, skipped when done). Returns the folder; read it
    with `read_scores(folder, top_k_tokens=k)`.

    train_ids: the id written for each row (default 0..N-1; unique). candidates: query name -> row indices to score
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
    if len(np.unique(train_ids)) != num_rows:
        raise ValueError(f"train_ids repeat ({num_rows - len(np.unique(train_ids))} duplicates): each (query, "
                         "train_id) must name one pair; give one id per training row")
    allowed = _candidate_mask(candidates, query_names, num_rows)
    num_shards = -(-num_rows // shard_args.shard_size)
    identity = {
        "format_version": SHARD_FORMAT_VERSION, "model_fingerprint": model_fingerprint(layers),
        "layer_names": [l.name for l in layers], "query_names": query_names,
        "query_checksum": _query_checksum(preconditioned_queries, [l.name for l in layers]),
        "data_fingerprint": _data_fingerprint(train, train_ids), "num_sequences": num_rows,
        "shard_size": shard_args.shard_size,
        "query_rank": score_args.query_rank, "low_rank": score_args.low_rank,
        "candidates": None if allowed is None else hashlib.sha256(np.packbits(allowed).tobytes()).hexdigest()[:16],
        "run": run_identity,
    }
    _open_folder(directory, identity, num_shards)

    work = {}
    for index in range(num_shards):
        if distributed.owns(index) and not _readable_shard(shard_path(directory, index)):
            start, stop = index * shard_args.shard_size, min(num_rows, (index + 1) * shard_args.shard_size)
            rows = np.arange(start, stop)
            work[index] = rows if allowed is None else rows[allowed[:, start:stop].any(axis=0)]
    dense_args = ScoreArguments(**{**asdict(score_args), "per_token": False, "progress": False})
    _score_parts(model, layers, task, train, preconditioned_queries, query_names, directory, work,
                 shard_args.batch_size, dense_args, _empty_table([l.name for l in layers]),
                 lambda scores, rows: _shard_table(scores, rows, train_ids, allowed),
                 f"score shards (rank {distributed.rank()})", score_args.progress)
    if shard_args.top_k_tokens:
        _score_top_tokens(model, layers, task, train, preconditioned_queries, query_names, directory, identity,
                          num_shards, train_ids, shard_args, score_args)
    return directory


def _score_top_tokens(model, layers, task, train, preconditioned_queries, query_names, directory: Path,
                      identity: dict, num_shards: int, train_ids: np.ndarray, shard_args: ShardArguments,
                      score_args: ScoreArguments) -> None:
    """The token pass: token-wise scores of each query's top_k_tokens highest-scoring sequences (read from the
    finished dense shards), the union of their rows scored once with per_token, into token_folder(directory, k)."""
    k = shard_args.top_k_tokens
    dense = pd.concat([_read_shard(shard_path(directory, i), ["query", "train_id", "score"]).to_pandas()
                       for i in range(num_shards)], ignore_index=True)
    top = top_pairs(dense, query_names, k, train_ids)  # (query index, row) pairs
    union = np.unique(top[:, 1])
    parts = [union[i : i + shard_args.shard_size] for i in range(0, len(union), shard_args.shard_size)]
    folder = token_folder(directory, k)
    _open_folder(folder, {**identity, "top_k_tokens": k,
                          "top_pairs": hashlib.sha256(top.tobytes()).hexdigest()[:16]}, len(parts))
    wanted = np.zeros((len(query_names), len(union)), dtype=bool)  # (Q, rows of the union)
    wanted[top[:, 0], np.searchsorted(union, top[:, 1])] = True
    cost, position = token_contraction_share(model, layers), {name: i for i, name in enumerate(query_names)}
    work = {i: token_jobs(rows, wanted[:, np.searchsorted(union, rows)], cost) for i, rows in enumerate(parts)
            if distributed.owns(i) and not _readable_shard(shard_path(folder, i))}
    token_args = ScoreArguments(**{**asdict(score_args), "per_token": True, "progress": False})
    _score_parts(model, layers, task, train, preconditioned_queries, query_names, folder, work, shard_args.batch_size,
                 token_args, _token_schema().empty_table(),
                 lambda scores, rows: _token_table(scores, rows, train_ids, wanted[[position[n] for n in
                                                   scores.query_names]][:, np.searchsorted(union, rows)], train),
                 f"token scores, top {k} (rank {distributed.rank()})", score_args.progress)


def token_contraction_share(model: nn.Module, layers: Sequence[TrackedLayer]) -> float:
    """c: the token-wise contraction of one query over a sequence (2 T d_out d_in multiply-adds per tracked layer,
    `dense_layer_scores`) over the sequence's forward + backward (~6 T flops per parameter, every parameter counted):
    2 (tracked parameters) / (6 (all parameters)). An estimate for choosing a plan, not a measurement."""
    tracked = sum(l.out_features * l.input_dim for l in layers)
    return 2 * tracked / (6 * max(1, sum(p.numel() for p in model.parameters())))


def token_jobs(rows: np.ndarray, wanted: np.ndarray, contraction_share: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """How one token part is scored: [(query indices, rows)] for wanted (Q, n) over its rows.

    Either every row with every query that wants one of them, in one pass (n passes, each with Q' token-wise
    contractions), or each query alone on its own rows (one pass per wanted pair, one contraction each): whichever
    costs fewer forward+backward equivalents, n (1 + Q' c) against pairs (1 + c), c = `token_contraction_share`.
    When each row is wanted by few of the queries (zoo_xl, k = 75: 2,550 pairs of 34 queries over 1,172 rows) the
    second plan is the cheap one."""
    queries = np.flatnonzero(wanted.any(axis=1))
    pairs = int(wanted.sum())
    together = len(rows) * (1 + len(queries) * contraction_share)
    if len(queries) <= 1 or together <= pairs * (1 + contraction_share):
        return [(queries, rows[wanted[queries].any(axis=0)])]
    return [(np.array([q]), rows[wanted[q]]) for q in queries]


def top_pairs(frame: pd.DataFrame, query_names: Sequence[str], k: int, train_ids: np.ndarray) -> np.ndarray:
    """(P, 2) int64 (query index, training row) of each query's k highest-scoring pairs in `frame` (query,
    train_id, score), queries in `query_names` order; ties go to the lower row, as in a stable sort by score."""
    query = pd.Categorical(frame["query"], categories=list(query_names)).codes.astype(np.int64)
    row = pd.Index(train_ids).get_indexer(frame["train_id"].to_numpy())
    order = np.lexsort((row, -frame["score"].to_numpy(dtype=np.float64), query))
    query, row = query[order], row[order]
    first = np.searchsorted(query, query, side="left")  # each pair's rank within its query = position - first
    keep = np.arange(len(query)) - first < k
    return np.stack([query[keep], row[keep]], axis=1).astype(np.int64)


def _score_parts(model, layers, task, train, preconditioned_queries, query_names, directory: Path,
                 work: dict[int, np.ndarray | list], batch_size: int, args: ScoreArguments, empty: pa.Table, table_of,
                 description: str, progress: bool) -> None:
    """Score this rank's parts and write each as shard_path(directory, index), atomically. A part is its training
    rows (every query), or a list of jobs (query indices, rows), each scored with those queries only (`token_jobs`);
    `table_of(scores, rows)` turns one call's InfluenceScores into table rows (`empty` when a part has no rows)."""
    jobs = {index: part if isinstance(part, list) else [(None, part)] for index, part in work.items()}
    # a model sharded over the ranks (FSDP) needs as many forward passes on every rank: the others' missing ones
    # are run on one row and discarded
    extra = distributed.padding_rounds(model, sum(-(-len(rows) // batch_size) for part in jobs.values()
                                                  for _, rows in part))
    for index in tqdm(jobs, desc=description, disable=not progress, leave=False):
        tables = []
        for queries, rows in jobs[index]:
            if not len(rows):
                continue
            chosen = torch.as_tensor(rows)
            batches = iterate_batches({k: v[chosen] for k, v in train.items()}, batch_size)
            chosen_queries, names = preconditioned_queries, query_names
            if queries is not None:
                chosen_queries = {n: _select_queries(q, queries) for n, q in preconditioned_queries.items()}
                names = [query_names[q] for q in queries]
            tables.append(table_of(compute_scores(model, layers, task, batches, chosen_queries, names, args), rows))
        _write_atomic(pa.concat_tables(tables) if tables else empty, shard_path(directory, index))
    if extra:
        filler = {k: v[:1] for k, v in train.items()}
        compute_scores(model, layers, task, [filler] * extra, preconditioned_queries, query_names, args)
    distributed.barrier()


def _select_queries(queries: torch.Tensor | LowRankQuery, indices: np.ndarray) -> torch.Tensor | LowRankQuery:
    """The preconditioned queries `indices` of one layer (dense (Q, d_out, d_in) or factored)."""
    chosen = torch.as_tensor(indices, dtype=torch.long)
    return queries.select(chosen) if isinstance(queries, LowRankQuery) else queries[chosen]


def read_scores(output_dir: str | Path, require_complete: bool = True, top_k_tokens: int = 0) -> pd.DataFrame:
    """All shard rows of a folder as one DataFrame (query, train_id, score, layer:<name>..., token_scores).

    token_scores: the token-wise scores (array over the sequence's tokens) of each query's top_k_tokens
    highest-scoring sequences, from the token pass `score_in_shards` ran with that k; None for every other pair
    (every pair with top_k_tokens=0).
    """
    directory = Path(output_dir)
    manifest = _read_manifest(directory)
    frame = _read_folder(directory, manifest, require_complete, _empty_table(manifest["layer_names"])).to_pandas()
    values = np.full(len(frame), None, dtype=object)
    if top_k_tokens:
        folder = token_folder(directory, top_k_tokens)
        if (folder / "manifest.json").exists() or require_complete:
            tokens = _read_folder(folder, _read_manifest(folder, top_k_tokens), require_complete,
                                  _token_schema().empty_table()).to_pandas()
            index = pd.MultiIndex.from_arrays([tokens["query"], tokens["train_id"]])
            position = index.get_indexer(pd.MultiIndex.from_arrays([frame["query"], frame["train_id"]]))
            found = position >= 0
            values[found] = tokens["token_scores"].to_numpy()[position[found]]
    frame["token_scores"] = values
    return frame


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


def _read_manifest(directory: Path, top_k_tokens: int | None = None) -> dict:
    """A folder's manifest, refused (ShardMismatchError) when written in another format; for a token folder the
    missing manifest names the rerun that makes it."""
    manifest_path = directory / "manifest.json"
    if not manifest_path.exists():
        if top_k_tokens is None:
            raise FileNotFoundError(f"no shard manifest in {directory}; run score_in_shards first")
        raise FileNotFoundError(f"no token scores for top_k_tokens={top_k_tokens} in {directory}; rerun "
                                f"score_in_shards with top_k_tokens={top_k_tokens} (it reuses the dense shards and "
                                "runs only the token pass)")
    manifest = read_json(manifest_path)
    version = manifest.get("identity", {}).get("format_version")
    if version != SHARD_FORMAT_VERSION:
        raise ShardMismatchError(f"shards in {directory} are in format {version!r}, this code reads format "
                                 f"{SHARD_FORMAT_VERSION}; delete the folder (or use another) and rerun "
                                 "score_in_shards")
    return manifest


def _read_folder(directory: Path, manifest: dict, require_complete: bool, empty: pa.Table) -> pa.Table:
    """Every shard of a folder as one table, in shard order (`empty` when there is none)."""
    paths = [shard_path(directory, i) for i in range(manifest["num_shards"])]
    missing = [p.name for p in paths if not p.exists()]
    if missing and require_complete:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} shards missing in {directory} "
                                f"(first: {missing[0]}); rerun the same command to finish them")
    tables = [_read_shard(p) for p in paths if p.exists()]
    return pa.concat_tables(tables) if tables else empty


def _read_shard(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=None if columns is None else list(columns))
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
    return pa.schema(fields)


def _token_schema() -> pa.Schema:
    return pa.schema([pa.field("query", pa.string()), pa.field("train_id", pa.int64()),
                      pa.field("token_scores", pa.list_(pa.float64()))])


def _empty_table(layer_names: Sequence[str]) -> pa.Table:
    return _schema(layer_names).empty_table()


def _shard_table(scores, rows: np.ndarray, train_ids: np.ndarray, allowed: np.ndarray | None) -> pa.Table:
    """Rows of one dense shard: every allowed (query, sequence) pair, query by query, rows in order."""
    total = scores.total.double().numpy()  # (Q, n)
    per_layer = scores.per_layer.double().numpy()  # (Q, n, L)
    keep = np.ones(total.shape, dtype=bool) if allowed is None else allowed[:, rows]  # (Q, n)
    query, column = np.nonzero(keep)  # query-major, rows ascending within a query
    data = {"query": [scores.query_names[q] for q in query], "train_id": train_ids[rows[column]],
            "score": total[query, column]}
    data.update({f"layer:{name}": per_layer[query, column, l] for l, name in enumerate(scores.layer_names)})
    return pa.table(data, schema=_schema(scores.layer_names))


def _token_table(scores, rows: np.ndarray, train_ids: np.ndarray, wanted: np.ndarray,
                 train: Mapping[str, torch.Tensor]) -> pa.Table:
    """Rows of one token part: (query, train_id, token_scores over the sequence's real tokens) for the pairs that
    `wanted` (Q, n), one row per query of `scores`, marks."""
    lengths = None
    if "attention_mask" in train:
        lengths = train["attention_mask"][torch.as_tensor(rows)].sum(dim=1).numpy()
    per_token = scores.per_token.double()  # (Q, n, T)
    query, column = np.nonzero(wanted)
    values = [per_token[q, j, : int(lengths[j]) if lengths is not None else per_token.shape[-1]].tolist()
              for q, j in zip(query, column)]
    return pa.table({"query": [scores.query_names[q] for q in query], "train_id": train_ids[rows[column]],
                     "token_scores": values}, schema=_token_schema())


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.rank{distributed.rank()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
