"""The gradient index (influence_core/index.py) against exact EK-FAC on a tiny float64 model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import influence_core.index as index_module
from engine_models import SUBPROCESS_CLASSIFIER, gpt_neox, query_batches
from influence_core import CausalLMTask, FactorArguments, compute_scores, fit_factors, iterate_batches, query_gradients, \
    track_layers
from zoo_fixtures import plain  # noqa: F401
from influence_core.index import GradientIndex, IndexArguments, IndexMismatchError, build_index, query_index, rerank

N = 10


def train_rows(n: int = N, length: int = 6, seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 16, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length - 2:] = 0  # one padded row, to exercise masking
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.fixture(scope="module")
def setup():
    model = gpt_neox()
    layers = track_layers(model)
    task = CausalLMTask()
    train = train_rows()
    factors = fit_factors(model, layers, task, iterate_batches(train, 4),
                          FactorArguments(dtype="float64", progress=False))
    exact = compute_scores(model, layers, task, iterate_batches(train, 4),
                           query_gradients(model, layers, task, query_batches(), progress=False, factors=factors)).total
    return model, layers, task, train, factors, exact


FULL = dict(output_dim=None, input_dim=None, dtype="float64", shard_size=3, batch_size=2, progress=False)


def test_full_dimension_index_equals_exact_ekfac(setup, tmp_path):
    model, layers, task, train, factors, exact = setup
    index = build_index(model, layers, task, train, factors, tmp_path, IndexArguments(**FULL))
    scores, _ = query_index(model, layers, task, query_batches(), factors, index)
    assert scores.shape == exact.shape == (3, N)
    torch.testing.assert_close(scores, exact, rtol=1e-9, atol=1e-9 * float(exact.abs().max()))
    assert index.bytes_per_sequence == 8 * sum(l.out_features * l.input_dim for l in layers)


def test_compressed_index_keeps_the_top_and_rerank_restores_exact_scores(setup, tmp_path):
    model, layers, task, train, factors, exact = setup
    args = IndexArguments(**{**FULL, "output_dim": 4, "input_dim": 4})
    index = build_index(model, layers, task, train, factors, tmp_path, args)
    scores, preconditioned = query_index(model, layers, task, query_batches(), factors, index)
    assert index.width == 4 * 4 * len(layers)
    assert not torch.allclose(scores, exact)  # compressed: an approximation
    correlation = torch.corrcoef(torch.stack([scores.flatten(), exact.flatten()]))[0, 1]
    assert correlation > 0.5, f"index scores correlate {correlation:.3f} with exact EK-FAC"
    rows, rescored = rerank(model, layers, task, train, preconditioned, scores, candidates=N)
    for q in range(3):  # every row a candidate: the re-rank is exact EK-FAC, in exact order
        torch.testing.assert_close(rescored[q], exact[q, rows[q]])
        assert rows[q].tolist() == torch.argsort(exact[q], descending=True).tolist()


def test_killed_build_resumes_at_the_first_missing_shard(setup, tmp_path, monkeypatch):
    model, layers, task, train, factors, _ = setup
    args = IndexArguments(**FULL)
    reference = build_index(model, layers, task, train, factors, tmp_path / "reference", args)
    write = index_module._write_shard
    calls = {"written": 0, "computed": 0}

    def dies_after_two(rows, path):
        if calls["written"] == 2:
            raise KeyboardInterrupt("killed")
        write(rows, path)
        calls["written"] += 1

    monkeypatch.setattr(index_module, "_write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_index(model, layers, task, train, factors, tmp_path / "index", args)
    with pytest.raises(IndexMismatchError, match="incomplete"):
        GradientIndex(tmp_path / "index")
    (tmp_path / "index" / "shard_000002.npy.tmp").write_bytes(b"half a shard")  # a write cut short
    monkeypatch.setattr(index_module, "_write_shard", write)
    compute = index_module.compressed_gradients

    def counting(*a, **k):
        calls["computed"] += 1
        return compute(*a, **k)

    monkeypatch.setattr(index_module, "compressed_gradients", counting)
    resumed = build_index(model, layers, task, train, factors, tmp_path / "index", args)
    assert calls["computed"] == 2  # shards 2 and 3 of 4
    for i in range(reference.num_shards):
        assert (resumed.shard(i) == reference.shard(i)).all()


def test_query_reads_no_training_data(setup, tmp_path):
    model, layers, task, train, factors, exact = setup
    build_index(model, layers, task, dict(train), factors, tmp_path, IndexArguments(**FULL))

    class QueryOnly(CausalLMTask):
        def training_loss(self, model, batch):
            raise AssertionError("the query touched the training data")

    index = GradientIndex(tmp_path)  # opened from disk alone
    scores, _ = query_index(model, layers, QueryOnly(), query_batches(), factors, index)
    torch.testing.assert_close(scores, exact, rtol=1e-9, atol=1e-9 * float(exact.abs().max()))


def test_other_settings_and_models_are_refused(setup, tmp_path):
    model, layers, task, train, factors, _ = setup
    build_index(model, layers, task, train, factors, tmp_path, IndexArguments(**FULL))
    with pytest.raises(IndexMismatchError, match="arguments"):
        build_index(model, layers, task, train, factors, tmp_path, IndexArguments(**{**FULL, "output_dim": 4}))
    other = gpt_neox(seed=1)
    with pytest.raises(IndexMismatchError, match="fingerprint"):
        GradientIndex(tmp_path).check_layers(track_layers(other))
    with pytest.raises(ValueError, match="projection"):
        IndexArguments(projection="pca")


def test_console_build_then_query(plain, tmp_path):  # noqa: F811
    """`influence-lab index build` / `index query` on the plain testbed: at full dimension the index score of every
    returned row is its exact EK-FAC influence (the re-rank's), and a query with --rerank 0 reads no corpus."""
    from experiments.cli import main as cli
    from experiments.plain import LICENCES
    import pandas as pd

    if not LICENCES.is_dir():
        pytest.skip(f"{LICENCES} (Debian base-files) is not on this machine")
    out = tmp_path / "index"
    cli(["index", "build", "--model", str(plain["gpt2"]), "--data", str(plain["corpus"]), "--truncate", "--dim", "0",
         "--storage-dtype", "float64", "--out", str(out), f"artifacts={tmp_path / 'artifacts'}",
         "influence.progress=false"])
    cli(["index", "query", "--index", str(out), "--queries", str(plain["queries"]), "--rerank", "1000", "--top-k", "5",
         "--out", str(tmp_path / "answer")])
    table = pd.read_csv(tmp_path / "answer" / "top_sequences.csv")
    assert len(table) and set(table.columns) >= {"query", "rank", "train_id", "index_score", "influence", "text"}
    scale = table["influence"].abs().max()
    assert (table["index_score"] - table["influence"]).abs().max() < 1e-4 * scale
    with pytest.raises(SystemExit):
        cli(["index", "query", "--index", str(out), "--queries", str(plain["queries"]), "stray=1"])


INDEX_BUILD = SUBPROCESS_CLASSIFIER + """
import influence_core.index as index_module
from influence_core.index import IndexArguments, build_index
args = IndexArguments(output_dim=3, input_dim=4, shard_size=4, batch_size=3, dtype="float64", progress=False)
if len(sys.argv) > 2:  # the killed run: shard 0 is written, then it hangs in shard 1 until SIGKILL
    real, calls = index_module.compressed_gradients, []
    def slow(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            time.sleep(60)
        return real(*a, **k)
    index_module.compressed_gradients = slow
build_index(model, layers, task, train, factors, sys.argv[1], args)
"""


def test_sigkilled_build_resumes(tmp_path):
    """A real SIGKILL (no Python cleanup) mid-build: the rerun keeps shard 0 and the index equals an unbroken build."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import numpy as np

    script = tmp_path / "build.py"
    script.write_text(INDEX_BUILD)
    root = str(Path(__file__).resolve().parents[1])  # this checkout's influence_core, whatever is installed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "index"
    proc = subprocess.Popen([sys.executable, str(script), str(out), "kill"], env=env)
    try:
        deadline = time.time() + 60
        while not (out / "shard_000000.npy").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (out / "shard_000000.npy").exists() and not (out / "shard_000001.npy").exists()
    first = (out / "shard_000000.npy").stat().st_mtime_ns
    subprocess.run([sys.executable, str(script), str(out)], env=env, check=True)
    subprocess.run([sys.executable, str(script), str(tmp_path / "unbroken")], env=env, check=True)
    assert (out / "shard_000000.npy").stat().st_mtime_ns == first
    resumed, unbroken = GradientIndex(out), GradientIndex(tmp_path / "unbroken")
    assert resumed.manifest["built_shards_last_run"] == 2 and resumed.num_shards == 3
    for i in range(3):
        np.testing.assert_array_equal(resumed.shard(i), unbroken.shard(i))
