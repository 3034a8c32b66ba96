"""The README's main job runs end to end on the micro zoo and finds the query's own fact on top."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from experiments.results import read_study
from zoo_fixtures import micro_zoo  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def test_demo_prints_and_saves_top_sequences(micro_zoo, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "experiments.demo", f"micro_zoo={micro_zoo.root}", f"artifacts={tmp_path}",
               "num_queries=2", "top_k=3", "influence.progress=false", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Query: word_order_F0000_forward" in result.stdout

    table = pd.read_csv(run_dir / "top_sequences.csv")
    assert len(table) == 2 * 3
    record = read_study(run_dir)  # the same contract as every run: the report renders it
    assert record.settings["influence"]["strategy"] == "ekfac" and record.queries == list(table["query"].unique())
    assert (run_dir / record.tables["top_sequences"]).exists()
    # The fact's own documents (relevant by construction) lead the ranking of each query.
    for query in [q for q in micro_zoo.queries if q.study == "word_order"][:2]:
        top = table[table["query"] == query.name].sort_values("rank")
        assert top.iloc[0]["doc_id"] in query.relevant_doc_ids, (query.name, top[["doc_id", "influence"]])


def test_a_wrong_config_key_is_refused(micro_zoo, tmp_path):  # noqa: F811
    command = [sys.executable, "-m", "experiments.demo", "influence.stratgy=kfac", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "stratgy" in result.stderr
