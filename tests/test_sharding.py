"""Streaming scores in shards and checkpointed factor passes: interrupted and resumed runs equal one-shot runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import influence_core.factors.passes as passes
import influence_core.sharding as sharding
from engine_models import SUBPROCESS_CLASSIFIER, gpt_neox, query_batches, token_batches
from influence_core import (CausalLMTask, FactorArguments, ScoreArguments, compute_scores, fit_factors,
                            precondition_queries, query_gradients, track_layers)
from influence_core.sharding import ShardArguments, ShardMismatchError, read_scores, score_in_shards, scores_matrix

ARGS = dict(dtype="float64", progress=False)
NAMES = ["q0", "q1", "q2"]


def merged(batches):
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


@pytest.fixture(scope="module")
def setup():
    model = gpt_neox()
    layers = track_layers(model)
    task = CausalLMTask()
    factors = fit_factors(model, layers, task, token_batches(8), FactorArguments(**ARGS))
    q = precondition_queries(query_gradients(model, layers, task, query_batches(), progress=False), factors)
    train = merged(token_batches(10))
    one_shot = compute_scores(model, layers, task, token_batches(10, batch_size=3), q, NAMES,
                              ScoreArguments(per_token=True, progress=False))
    return model, layers, task, q, train, one_shot


def run(setup, out, **kwargs):
    model, layers, task, q, train, _ = setup
    shard_args = kwargs.pop("shard_args", ShardArguments(shard_size=4, batch_size=3, top_k_tokens=2))
    return score_in_shards(model, layers, task, train, q, NAMES, out, shard_args,
                           ScoreArguments(progress=False, **kwargs.pop("score", {})), **kwargs)


def top_k_tokens(top_k, **kwargs):
    return ShardArguments(**{"shard_size": 4, "batch_size": 3, "top_k_tokens": top_k, **kwargs})


def check_equal(frame, one_shot, layer_names, top_k=2):
    torch.testing.assert_close(scores_matrix(frame, NAMES, 10), one_shot.total)
    for l, name in enumerate(layer_names):
        torch.testing.assert_close(scores_matrix(frame, NAMES, 10, f"layer:{name}"), one_shot.per_layer[..., l])
    with_tokens = frame[frame["token_scores"].notna()]
    # each query's top k over all shards, and only those
    expected_pairs = {(name, int(i)) for q, name in enumerate(NAMES) for i in one_shot.total[q].topk(top_k).indices}
    assert set(zip(with_tokens["query"], with_tokens["train_id"])) == expected_pairs
    for row in with_tokens.itertuples():
        expected = one_shot.per_token[NAMES.index(row.query), row.train_id]
        torch.testing.assert_close(torch.tensor(row.token_scores), expected[: len(row.token_scores)])
        assert row.score == pytest.approx(sum(row.token_scores))


class CountedPasses:
    """Counts compute_scores calls of the dense pass (per_token off) and of the token pass (per_token on)."""

    def __init__(self, monkeypatch, fail_at: tuple[str, int] | None = None):
        self.real, self.fail_at, self.calls = sharding.compute_scores, fail_at, {"dense": 0, "tokens": 0}
        monkeypatch.setattr(sharding, "compute_scores", self)

    def __call__(self, *args, **kwargs):
        kind = "tokens" if args[6].per_token else "dense"
        self.calls[kind] += 1
        if self.fail_at == (kind, self.calls[kind]):
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


def test_sharded_equals_one_shot(setup, tmp_path):
    out = run(setup, tmp_path)
    assert sorted(p.name for p in out.glob("shard_*.parquet")) == [f"shard_{i:06d}.parquet" for i in range(3)]
    check_equal(read_scores(out, top_k_tokens=2), setup[5], [l.name for l in setup[1]])
    assert read_scores(out)["token_scores"].isna().all()  # top_k_tokens=0: no token scores asked for


def test_interrupted_run_resumes_without_recomputing(setup, tmp_path, monkeypatch):
    counted = CountedPasses(monkeypatch, fail_at=("dense", 2))
    with pytest.raises(KeyboardInterrupt):
        run(setup, tmp_path)
    assert [p.name for p in tmp_path.glob("shard_*.parquet")] == ["shard_000000.parquet"]
    with pytest.raises(FileNotFoundError, match="2 of 3 shards missing"):
        read_scores(tmp_path)
    (tmp_path / "shard_000001.parquet.rank0.tmp").write_bytes(b"half a parquet file")  # killed while writing
    finished = (tmp_path / "shard_000000.parquet").stat().st_mtime_ns
    counted = CountedPasses(monkeypatch)
    run(setup, tmp_path)
    assert counted.calls["dense"] == 2 and (tmp_path / "shard_000000.parquet").stat().st_mtime_ns == finished
    assert not list(tmp_path.glob("*.tmp"))
    check_equal(read_scores(tmp_path, top_k_tokens=2), setup[5], [l.name for l in setup[1]])


def test_token_scores_equal_per_token_scores_of_those_rows(setup, tmp_path):
    """The two-pass path's token scores are compute_scores(per_token=True) on just the chosen rows, and they sum to
    the dense pass's score of the pair."""
    model, layers, task, q, train, one_shot = setup
    frame = read_scores(run(setup, tmp_path, shard_args=top_k_tokens(3)), top_k_tokens=3)
    chosen = frame[frame["token_scores"].notna()]
    assert len(chosen) == 3 * 3
    rows = sorted(set(chosen["train_id"]))
    direct = compute_scores(model, layers, task, [{k: v[rows] for k, v in train.items()}], q, NAMES,
                            ScoreArguments(per_token=True, progress=False))
    for row in chosen.itertuples():
        width = int(train["attention_mask"][row.train_id].sum())
        expected = direct.per_token[NAMES.index(row.query), rows.index(row.train_id), :width]
        assert len(row.token_scores) == width
        torch.testing.assert_close(torch.tensor(row.token_scores), expected)
        assert sum(row.token_scores) == pytest.approx(row.score, rel=1e-10, abs=1e-12)
        assert row.score == pytest.approx(float(one_shot.total[NAMES.index(row.query), row.train_id]), rel=1e-12)


def test_dense_pass_is_shared_over_top_k_tokens(setup, tmp_path, monkeypatch):
    """The dense shards do not depend on top_k_tokens; another k runs only the token pass, the same k nothing."""
    fresh = {}
    for top_k in (0, 5, 75):  # 75 > the 10 rows: every row gets token scores
        frame = read_scores(run(setup, tmp_path / f"fresh_{top_k}", shard_args=top_k_tokens(top_k)))
        fresh[top_k] = frame
        assert frame.drop(columns="token_scores").equals(fresh[0].drop(columns="token_scores"))
    shared = tmp_path / "shared"
    counted = CountedPasses(monkeypatch)
    run(setup, shared, shard_args=top_k_tokens(0))
    assert counted.calls == {"dense": 3, "tokens": 0} and not list(shared.glob("tokens_top*"))
    written = {p.name: p.stat().st_mtime_ns for p in shared.glob("shard_*.parquet")}
    for top_k, again in [(5, False), (5, True), (75, False), (2, False)]:
        counted = CountedPasses(monkeypatch)
        run(setup, shared, shard_args=top_k_tokens(top_k))
        assert counted.calls["dense"] == 0, f"top_k_tokens={top_k} reran the dense pass"
        parts = sharding.read_json(sharding.token_folder(shared, top_k) / "manifest.json")["num_shards"]
        assert counted.calls["tokens"] == (0 if again else parts)  # one call per part of <= 4 rows
        assert {p.name: p.stat().st_mtime_ns for p in shared.glob("shard_*.parquet")} == written
    assert sharding.read_json(sharding.token_folder(shared, 75) / "manifest.json")["num_shards"] == 3  # all 10 rows
    for top_k in (2, 5, 75):
        frame = read_scores(shared, top_k_tokens=top_k)
        assert frame.drop(columns="token_scores").equals(fresh[0].drop(columns="token_scores"))
        check_equal(frame, setup[5], [l.name for l in setup[1]], top_k=min(top_k, 10))
    assert len(read_scores(shared, top_k_tokens=75)["token_scores"].dropna()) == 3 * 10
    with pytest.raises(FileNotFoundError, match="no token scores for top_k_tokens=7.*only the token pass"):
        read_scores(shared, top_k_tokens=7)


def test_token_jobs_choose_the_cheaper_plan():
    """Hand-made part of 4 rows and 3 queries: each query alone on its rows when few queries share a row, all
    wanting queries together when they share them; a single query is always one job."""
    rows = np.array([10, 11, 12, 13])
    disjoint = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=bool)  # 4 pairs over 4 rows
    # together: 4 rows x (1 + 3 c); alone: 4 pairs x (1 + c); with c = 0.5: 10 against 6
    jobs = sharding.token_jobs(rows, disjoint, 0.5)
    assert [(list(q), list(r)) for q, r in jobs] == [([0], [10, 11]), ([1], [12]), ([2], [13])]
    shared = np.ones((3, 4), dtype=bool)  # 12 pairs: together 4 x 2.5 = 10 against 12 x 1.5 = 18
    assert [(list(q), list(r)) for q, r in sharding.token_jobs(rows, shared, 0.5)] == [([0, 1, 2], [10, 11, 12, 13])]
    one = np.array([[0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=bool)
    assert [(list(q), list(r)) for q, r in sharding.token_jobs(rows[[0, 2]], one[:, [0, 2]], 5.0)] == [([1], [10, 12])]


def test_token_pass_query_by_query_equals_all_queries_at_once(setup, tmp_path, monkeypatch):
    """Forcing the query-by-query plan (a large contraction share) gives the same token scores, pairs and order."""
    at_once = read_scores(run(setup, tmp_path / "at_once", shard_args=top_k_tokens(3)), top_k_tokens=3)
    monkeypatch.setattr(sharding, "token_contraction_share", lambda model, layers: 100.0)
    counted = CountedPasses(monkeypatch)
    alone = read_scores(run(setup, tmp_path / "alone", shard_args=top_k_tokens(3)), top_k_tokens=3)
    parts = sharding.read_json(sharding.token_folder(tmp_path / "alone", 3) / "manifest.json")["num_shards"]
    assert counted.calls["tokens"] > parts  # more than one call in some part: queries scored apart
    check_equal(alone, setup[5], [l.name for l in setup[1]], top_k=3)
    assert list(alone["query"]) == list(at_once["query"]) and list(alone["train_id"]) == list(at_once["train_id"])
    for a, b in zip(alone["token_scores"].dropna(), at_once["token_scores"].dropna()):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_interrupted_token_pass_resumes(setup, tmp_path, monkeypatch):
    shard_args = top_k_tokens(4, shard_size=2)  # up to 12 rows of token scores: parts of 2 rows
    CountedPasses(monkeypatch, fail_at=("tokens", 2))
    with pytest.raises(KeyboardInterrupt):
        run(setup, tmp_path, shard_args=shard_args)
    folder = sharding.token_folder(tmp_path, 4)
    parts = sorted(p.name for p in folder.glob("shard_*.parquet"))
    assert parts == ["shard_000000.parquet"]
    with pytest.raises(FileNotFoundError, match="shards missing"):
        read_scores(tmp_path, top_k_tokens=4)
    first = (folder / "shard_000000.parquet").stat().st_mtime_ns
    counted = CountedPasses(monkeypatch)
    run(setup, tmp_path, shard_args=shard_args)
    num_parts = sharding.read_json(folder / "manifest.json")["num_shards"]
    assert counted.calls == {"dense": 0, "tokens": num_parts - 1}
    assert (folder / "shard_000000.parquet").stat().st_mtime_ns == first
    check_equal(read_scores(tmp_path, top_k_tokens=4), setup[5], [l.name for l in setup[1]], top_k=4)


def test_top_pairs_break_ties_like_a_stable_sort():
    """Ties go to the lower row, the order pipeline.top_sequences shows (a stable sort by score)."""
    import pandas as pd

    frame = pd.DataFrame({"query": ["b", "b", "b", "a", "a", "a"], "train_id": [10, 11, 12, 12, 11, 10],
                          "score": [1.0, 2.0, 2.0, 0.5, 0.5, 0.7]})
    pairs = sharding.top_pairs(frame, ["a", "b"], 2, sharding.np.array([10, 11, 12]))
    assert pairs.tolist() == [[0, 0], [0, 1], [1, 1], [1, 2]]  # a: 10 (0.7), then 11 before 12; b: 11, 12


def test_stale_format_is_refused(setup, tmp_path):
    run(setup, tmp_path, shard_args=top_k_tokens(0))
    manifest = tmp_path / "manifest.json"
    saved = sharding.read_json(manifest)
    saved["identity"]["format_version"] = 1
    manifest.write_text(sharding.json.dumps(saved))
    with pytest.raises(ShardMismatchError, match="format 1"):
        read_scores(tmp_path)
    with pytest.raises(ShardMismatchError, match="format_version"):
        run(setup, tmp_path, shard_args=top_k_tokens(0))


def test_other_runs_are_refused(setup, tmp_path):
    run(setup, tmp_path)
    with pytest.raises(ShardMismatchError, match="shard_size"):
        run(setup, tmp_path, shard_args=top_k_tokens(2, shard_size=5))
    with pytest.raises(ShardMismatchError, match="query_rank"):
        run(setup, tmp_path, score={"query_rank": 2})
    with pytest.raises(ShardMismatchError, match="run"):
        run(setup, tmp_path, run_identity={"config": "other"})


def test_candidates_score_only_their_pairs(setup, tmp_path):
    candidates = {"q0": [1, 9], "q1": [9], "q2": []}
    frame = read_scores(run(setup, tmp_path, candidates=candidates))
    assert sorted(zip(frame["query"], frame["train_id"])) == [("q0", 1), ("q0", 9), ("q1", 9)]
    matrix = scores_matrix(frame, NAMES, 10)
    one_shot = setup[5].total
    for q, n in [(0, 1), (0, 9), (1, 9)]:
        assert float(matrix[q, n]) == pytest.approx(float(one_shot[q, n]))
    assert pq.read_table(tmp_path / "shard_000001.parquet").num_rows == 0  # rows 4-7: no candidate
    tokens = read_scores(tmp_path, top_k_tokens=2).dropna(subset=["token_scores"])  # the top 2 among the candidates
    assert sorted(zip(tokens["query"], tokens["train_id"])) == [("q0", 1), ("q0", 9), ("q1", 9)]


def test_repeated_train_ids_are_refused(setup, tmp_path):
    with pytest.raises(ValueError, match="train_ids repeat"):
        run(setup, tmp_path, train_ids=[0, 1, 2, 3, 4, 5, 6, 7, 8, 8])


@pytest.mark.parametrize("fraction, first_stop, second_stop, last_calls", [
    (None, 3, 6, 1),  # third covariance batch (two checkpointed); then 2 left and the correction stops at its third
    (0.5, 2, 4, 2),   # covariance_fraction 0.5 of 4 batches: the covariance pass stops after 2
])
def test_factor_pass_checkpoint_resumes_mid_pass(tmp_path, monkeypatch, fraction, first_stop, second_stop, last_calls):
    """Interrupting the covariance pass, then the correction pass, and resuming gives the one-shot fit."""
    model = gpt_neox()
    layers = track_layers(model)
    fit = token_batches(16, batch_size=4)
    args = FactorArguments(checkpoint_every=1, covariance_fraction=fraction, **ARGS)
    real = passes.pseudo_gradients
    calls = []

    def counting(*a, **k):
        calls.append(1)
        if fail_at and len(calls) == fail_at:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(passes, "pseudo_gradients", counting)
    fail_at = first_stop
    with pytest.raises(KeyboardInterrupt):
        fit_factors(model, layers, CausalLMTask(), fit, args, output_dir=tmp_path)
    assert (tmp_path / "covariance.partial.rank0.safetensors").exists()
    calls.clear()
    fail_at = second_stop
    with pytest.raises(KeyboardInterrupt):
        fit_factors(model, layers, CausalLMTask(), fit, args, output_dir=tmp_path)
    assert not (tmp_path / "covariance.partial.rank0.safetensors").exists()
    calls.clear()
    fail_at = None
    resumed = fit_factors(model, layers, CausalLMTask(), fit, args, output_dir=tmp_path)
    assert len(calls) == last_calls  # only the correction batches not yet checkpointed
    fresh = fit_factors(model, layers, CausalLMTask(), fit, FactorArguments(covariance_fraction=fraction, **ARGS))
    for name in fresh.layers:
        torch.testing.assert_close(resumed.layers[name].eigenvalues, fresh.layers[name].eigenvalues)
        torch.testing.assert_close(resumed.layers[name].activation_eigenvectors.abs(),
                                   fresh.layers[name].activation_eigenvectors.abs())


BUILD = SUBPROCESS_CLASSIFIER + """
from influence_core import ScoreArguments, precondition_queries, query_gradients
from influence_core.sharding import ShardArguments
q = precondition_queries(query_gradients(model, layers, task, iterate_batches({k: v[:3] for k, v in train.items()}, 3),
                                         progress=False), factors)
shard_args, score_args = ShardArguments(shard_size=4, batch_size=3, top_k_tokens=2), ScoreArguments(progress=False)
"""

KILLED_SCRIPT = BUILD + """
import sys, time
import influence_core.sharding as sharding
real, calls = sharding.compute_scores, []
def slow(*a, **k):
    calls.append(1)
    if len(calls) > 1:
        time.sleep(60)  # shard 0 is written; the test kills us while shard 1 is being scored
    return real(*a, **k)
sharding.compute_scores = slow
sharding.score_in_shards(model, layers, task, train, q, ["q0", "q1", "q2"], sys.argv[1], shard_args, score_args)
"""


def test_sigkilled_run_resumes(tmp_path):
    """A real SIGKILL (no Python cleanup): the rerun keeps the finished shard and equals the one-shot scores."""
    script = tmp_path / "score.py"
    script.write_text(KILLED_SCRIPT)
    out = tmp_path / "shards"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        while not (out / "shard_000000.parquet").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (out / "shard_000000.parquet").exists() and not (out / "shard_000001.parquet").exists()
    first = (out / "shard_000000.parquet").stat().st_mtime_ns

    scope: dict = {}
    exec(BUILD, scope)  # the same model, queries and data, in this process
    score_in_shards(scope["model"], scope["layers"], scope["task"], scope["train"], scope["q"], NAMES, out,
                    scope["shard_args"], scope["score_args"])
    assert (out / "shard_000000.parquet").stat().st_mtime_ns == first
    one_shot = compute_scores(scope["model"], scope["layers"], scope["task"], [scope["train"]], scope["q"], NAMES,
                              ScoreArguments(progress=False))
    torch.testing.assert_close(scores_matrix(read_scores(out), NAMES, 10), one_shot.total)
