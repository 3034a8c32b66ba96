"""Data parallelism: 2 CPU processes (gloo) give the same factors and scores as 1 process.

Plain torch models only, so the spawned processes start fast (no transformers import).

Tolerance: float64, and the sums are added in another order (per rank, then all-reduced): scores within 1e-12 of
the largest |score| and eigenvalues within 1e-12 of the largest eigenvalue (measured: 6.2e-15 and 2.7e-15), on top
of torch.testing.assert_close's float64 defaults per entry. Sharded weights (FSDP) in float32: tests/test_fsdp.py.
"""

from __future__ import annotations


import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from influence_core import (FactorArguments, ScoreArguments, Task, fit_factors, iterate_batches, precondition_queries,
                            query_gradients, track_layers)
from influence_core.sharding import ShardArguments, read_scores, score_in_shards, scores_matrix

from engine_models import gloo_process_group

NAMES = ["q0", "q1", "q2"]
RELATIVE_TOLERANCE = 1e-12  # of the largest |score| (and of the largest eigenvalue): float64 summation order


class SequenceTask(Task):
    """A tiny sequence model: tokens -> embedding -> MLP -> logits at every position; labels = next token."""

    def forward(self, model, batch):
        return model(batch["input_ids"])[:, :-1], batch["labels"][:, 1:]

    def token_mask(self, batch):
        return batch["attention_mask"].bool()


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 11)).double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 11, (23, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[::4, 3:] = 0  # some right padding
    data = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    queries = {k: v[20:] for k, v in data.items()}
    train = {k: v[:20] for k, v in data.items()}
    return model, track_layers(model, ["1", "3"]), SequenceTask(), train, queries


def pipeline(factors_dir, shards_dir, covariance_fraction=None):
    model, layers, task, train, queries = build()
    # 7 fitting batches of 3 (the last of 2): an uneven split over 2 ranks; covariance_fraction 0.4: the covariances
    # from the first 3 of them, 2 on rank 0 and 1 on rank 1
    args = FactorArguments(dtype="float64", progress=False, checkpoint_every=2, covariance_fraction=covariance_fraction)
    factors = fit_factors(model, layers, task, iterate_batches(train, 3), args, output_dir=factors_dir)
    q = precondition_queries(query_gradients(model, layers, task, iterate_batches(queries, 3), progress=False), factors)
    score_in_shards(model, layers, task, train, q, NAMES, shards_dir, ShardArguments(shard_size=3, batch_size=2),
                    ScoreArguments(progress=False, query_rank=2))
    return factors


def worker(rank: int, world: int, root: str, covariance_fraction: float | None) -> None:
    with gloo_process_group(rank, world, root):
        factors = pipeline(f"{root}/factors_parallel", f"{root}/shards_parallel", covariance_fraction)
        torch.save({n: (lf.eigenvalues, lf.activation_eigenvectors, lf.gradient_eigenvectors)
                    for n, lf in factors.layers.items()}, f"{root}/factors_rank{rank}.pt")


@pytest.mark.parametrize("covariance_fraction", [None, 0.4])
def test_two_processes_equal_one(tmp_path, covariance_fraction):
    mp.start_processes(worker, args=(2, str(tmp_path), covariance_fraction), nprocs=2, join=True, start_method="spawn")
    single = pipeline(tmp_path / "factors_single", tmp_path / "shards_single", covariance_fraction)

    for rank in range(2):
        parallel = torch.load(tmp_path / f"factors_rank{rank}.pt")
        for name, lf in single.layers.items():
            eigenvalues, q_a, q_s = parallel[name]
            torch.testing.assert_close(eigenvalues, lf.eigenvalues)
            assert float((eigenvalues - lf.eigenvalues).abs().max()) <= RELATIVE_TOLERANCE * float(lf.eigenvalues.max())
            # eigenvectors up to sign
            torch.testing.assert_close((q_a.T @ lf.activation_eigenvectors).abs().diagonal(),
                                       torch.ones(len(q_a), dtype=torch.float64))
    saved = (tmp_path / "factors_parallel" / "covariance.safetensors")
    assert saved.exists() and not list((tmp_path / "factors_parallel").glob("*.partial.*"))
    assert float(load_file(saved)["num_sequences"]) == (20 if covariance_fraction is None else 9)  # 3 batches of 3

    one = scores_matrix(read_scores(tmp_path / "shards_single"), NAMES, 20)
    two_frame = read_scores(tmp_path / "shards_parallel")
    assert len(two_frame) == 3 * 20
    two = scores_matrix(two_frame, NAMES, 20)
    torch.testing.assert_close(two, one)
    assert float((two - one).abs().max()) <= RELATIVE_TOLERANCE * float(one.abs().max())
    # the token pass (default top_k_tokens=10), its parts split over the ranks as the shards are
    one_tokens, two_tokens = (token_scores(tmp_path / f"shards_{kind}") for kind in ("single", "parallel"))
    assert set(two_tokens) == set(one_tokens) and len(one_tokens) == 3 * 10
    for pair, values in one_tokens.items():
        torch.testing.assert_close(two_tokens[pair], values)


def token_scores(folder) -> dict:
    frame = read_scores(folder, top_k_tokens=10)
    kept = frame[frame["token_scores"].notna()]
    return {(q, n): torch.as_tensor(v) for q, n, v in zip(kept["query"], kept["train_id"], kept["token_scores"])}
