"""Sharded weights: a tiny GPT-NeoX sharded over 2 CPU processes (gloo) with FSDP2 (`fully_shard`) gives the factors
and scores of 1 unsharded process.

Each rank holds half of every weight; a forward or backward pass all-gathers a block's weights, so the tracked layers'
hooks see whole-weight inputs and outputs, per rank as in data parallelism. The layers are tracked before sharding,
so their shapes are the unsharded ones. The split is uneven (7 fitting batches, 11 scoring batches over 2 ranks):
the rank with fewer batches runs filler passes, without which the other rank's all-gathers would hang.

Tolerance: float32 weights, and the sums are added in another order (per rank, then all-reduced), so the numbers
agree to float32 rounding, not bitwise: scores within 1e-5 of the largest |score|, eigenvalues within 1e-5 of the
largest eigenvalue (scores measured: 2.8e-7 of the largest).
"""

from __future__ import annotations


import pytest
import torch
import torch.multiprocessing as mp

from influence_core import (FactorArguments, ScoreArguments, fit_factors, iterate_batches, precondition_queries,
                            query_gradients, track_layers)
from influence_core import distributed
from influence_core.factors.stages import read_json
from influence_core.sharding import ShardArguments, read_scores, score_in_shards, scores_matrix

from engine_models import gloo_process_group

NAMES = ["q0", "q1", "q2"]
NUM_TRAIN = 21
SCORE_TOLERANCE = 1e-5  # of the largest |score|: float32 rounding (measured: 2.8e-7)
EIGENVALUE_TOLERANCE = 1e-5  # of the largest eigenvalue


def build():
    """A 2-block GPT-NeoX (hidden 8, MLP 12, vocabulary 16) in float32, training rows and queries."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from influence_core import CausalLMTask

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=16, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=12, max_position_embeddings=16)
    model = GPTNeoXForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 16, (NUM_TRAIN + 3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[::4, 4:] = 0  # some right padding
    labels = ids.masked_fill(mask == 0, -100)
    data = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    train = {k: v[:NUM_TRAIN] for k, v in data.items()}
    queries = {k: v[NUM_TRAIN:].clone() for k, v in data.items()}
    queries["labels"][:, :2] = -100  # prompt
    return model, CausalLMTask(), train, queries


def pipeline(model, layers, task, train, queries, factors_dir, shards_dir, covariance_fraction=None):
    # 7 fitting batches of 3 and 6 shards of 4 rows (11 scoring batches of 2): uneven over 2 ranks; covariance_fraction
    # 0.4: the covariances from the first 3 batches, so rank 1 runs a filler pass there
    args = FactorArguments(progress=False, checkpoint_every=2, covariance_fraction=covariance_fraction)
    factors = fit_factors(model, layers, task, iterate_batches(train, 3), args, output_dir=factors_dir)
    q = precondition_queries(query_gradients(model, layers, task, iterate_batches(queries, 2), progress=False), factors)
    score_in_shards(model, layers, task, train, q, NAMES, shards_dir, ShardArguments(shard_size=4, batch_size=2),
                    ScoreArguments(progress=False))
    return factors


def worker(rank: int, world: int, root: str, covariance_fraction: float | None) -> None:
    with gloo_process_group(rank, world, root):
        model, task, train, queries = build()
        layers = track_layers(model, ["*mlp*"])  # before sharding: the unsharded shapes
        distributed.shard_model(model)
        weight = layers[0].module.weight
        assert distributed.is_sharded(model) and weight.to_local().shape[0] < weight.shape[0]
        factors = pipeline(model, layers, task, train, queries, f"{root}/factors_sharded", f"{root}/shards_sharded",
                           covariance_fraction)
        torch.save({n: lf.eigenvalues for n, lf in factors.layers.items()}, f"{root}/eigenvalues_rank{rank}.pt")


@pytest.mark.parametrize("covariance_fraction", [None, 0.4])
def test_two_sharded_processes_equal_one(tmp_path, covariance_fraction):
    mp.start_processes(worker, args=(2, str(tmp_path), covariance_fraction), nprocs=2, join=True, start_method="spawn")
    model, task, train, queries = build()
    layers = track_layers(model, ["*mlp*"])
    single = pipeline(model, layers, task, train, queries, tmp_path / "factors_single", tmp_path / "shards_single",
                      covariance_fraction)

    for rank in range(2):
        sharded = torch.load(tmp_path / f"eigenvalues_rank{rank}.pt")
        for name, lf in single.layers.items():
            scale = float(lf.eigenvalues.abs().max())
            torch.testing.assert_close(sharded[name], lf.eigenvalues, rtol=0, atol=EIGENVALUE_TOLERANCE * scale)
    # the sharded run fingerprinted the whole weights, as the unsharded one did
    manifests = [read_json(tmp_path / f"factors_{kind}" / "manifest.json") for kind in ("single", "sharded")]
    assert manifests[0]["layer_fingerprints"] == manifests[1]["layer_fingerprints"]
    assert manifests[0]["layer_shapes"] == manifests[1]["layer_shapes"]
    one = scores_matrix(read_scores(tmp_path / "shards_single"), NAMES, NUM_TRAIN)
    two = scores_matrix(read_scores(tmp_path / "shards_sharded"), NAMES, NUM_TRAIN)
    assert not torch.isnan(two).any()
    largest = float(one.abs().max())
    assert largest > 0
    assert float((two - one).abs().max()) <= SCORE_TOLERANCE * largest
    # the token pass (default top_k_tokens=10): parts over the ranks, with filler passes where a rank has fewer
    one_tokens, two_tokens = (token_scores(tmp_path / f"shards_{kind}") for kind in ("single", "sharded"))
    assert set(two_tokens) == set(one_tokens) and len(one_tokens) == 3 * 10
    for pair, values in one_tokens.items():
        torch.testing.assert_close(two_tokens[pair], values, rtol=0, atol=SCORE_TOLERANCE * largest)


def token_scores(folder) -> dict:
    frame = read_scores(folder, top_k_tokens=10)
    kept = frame[frame["token_scores"].notna()]
    return {(q, n): torch.as_tensor(v) for q, n, v in zip(kept["query"], kept["train_id"], kept["token_scores"])}
