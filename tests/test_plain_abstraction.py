"""The three abstraction studies (scale, math_code, roleplay) on any causal LM and a text-only corpus: the plain
testbed's Llama over Debian's licence texts, through the console command."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from experiments.cli import main as cli
from experiments.plain import LICENCES
from experiments.queries import load_query_file
from experiments.results import VERDICTS, read_rows, read_study
from zoo_fixtures import plain  # noqa: F401

pytestmark = pytest.mark.skipif(not LICENCES.is_dir(), reason=f"{LICENCES} (Debian base-files) is not on this machine")

TOP_K = 5


@pytest.mark.parametrize("study", ["scale", "math_code", "roleplay"])
def test_abstraction_study_on_a_plain_corpus(study, plain, tmp_path):  # noqa: F811
    out = tmp_path / study
    cli(["study", study, "--model", str(plain["llama"]), "--data", str(plain["corpus"]), "--queries",
         str(plain["queries"]), "--truncate", "--out", str(out), f"artifacts={tmp_path / 'artifacts'}",
         "influence.progress=false", f"top_k={TOP_K}", "top_k_tokens=10", "bootstrap_samples=100"])
    record = read_study(out)
    names = [q.name for q in load_query_file(plain["queries"])]
    assert record.study == study and record.models[0].architecture == "LlamaForCausalLM"
    assert record.corpus.columns == ["text"]
    assert all((out / f).exists() for f in [*record.tables.values(), *record.figures.values()])
    assert "top_sequences_by_size" in record.figures and "Sec 5.3" in record.paper["top_sequences_by_size"]
    assert not {"top_sequence_relations", "relation_shares", "category_shares", "influence_share_by_kind"} & set(
        record.tables)  # the synthetic world's statistics need its columns

    per_query = pd.read_csv(out / "abstraction_per_query.csv")
    assert per_query["query"].tolist() == names  # a plain query file: every query, in every study
    assert (per_query["n_top"] <= TOP_K).all() and (per_query["n_baseline"] == TOP_K).all()
    finite = per_query.dropna(subset=["ci_low"])
    assert len(finite) and ((finite["ci_low"] <= finite["overlap_difference"] + 1e-12)
                            & (finite["overlap_difference"] <= finite["ci_high"] + 1e-12)).all()
    assert per_query["zero_overlap_share"].dropna().between(0, 1).all()
    for top_ids, baseline_ids in zip(per_query["top_train_ids"].astype(str), per_query["baseline_train_ids"].astype(str)):
        assert not set(top_ids.split()) & set(baseline_ids.split())  # the baseline lies outside the top k
    by_model = pd.read_csv(out / "abstraction_by_model.csv")
    assert len(by_model) == 1 and by_model["n_queries"].iloc[0] == len(names)

    counts = pd.read_csv(out / "spurious_counts.csv")
    flagged = pd.read_csv(out / "flagged_spurious.csv")
    assert counts["query"].tolist() == names and (counts["candidates"] == 10).all()
    assert counts["flagged"].sum() == len(flagged) and (counts["kept"] <= TOP_K).all()
    top = read_rows(out / record.tables["top_sequences"])
    flagged_ids = set(zip(top[top["spurious"] == True]["query"], top[top["spurious"] == True]["train_id"]))  # noqa: E712
    assert flagged_ids == set(zip(flagged["query"], flagged["train_id"]))
    counted = {(q, int(i)) for q, ids in zip(per_query["query"], per_query["top_train_ids"].fillna("").astype(str))
               for i in ids.split()}
    assert not counted & flagged_ids  # flagged sequences are never counted

    verdicts = record.verdicts
    assert len(verdicts) == 5 and all(v["verdict"] in VERDICTS for v in verdicts)
    trends = [v for v in verdicts if v["scope"].startswith("across")]
    assert len(trends) == 3 and all(v["verdict"] == "underpowered" for v in trends)  # one model, one seed
    assert all(v["n_models"] == 1 and v["n_seeds"] == 1 for v in verdicts)
    readme = (out / "README.md").read_text()
    assert "every query in the file" in readme and "||a||_2/||a||_1 > 2/3" in readme


def test_shaded_lines_wrap_and_window():
    from experiments.abstraction import shaded_lines

    lines = shaded_lines(["ab", "cd\nef", "ghij"], [1.0, -2.0, None], width=4)
    assert lines == [[("ab", 1.0), ("cd", -2.0)], [("ef", -2.0), ("gh", None)], [("ij", None)]]
    tokens, scores = [f"t{i:02d} " for i in range(40)], [0.0] * 40
    scores[30] = 5.0  # the peak: a long sequence is shown from a little before it
    window = shaded_lines(tokens, scores, width=20, max_lines=2)
    text = "".join(piece for line in window for piece, _ in line)
    assert text.startswith("…") and "t30" in text and text.endswith("…") and len(window) == 2
