"""The word-order study on the plain testbed through the console command: our hand-written probes (not the paper's)
for two licence queries, scored outside the text-only corpus; the fine-tuning extension is skipped there."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from experiments.cli import main as cli
from experiments.plain import LICENCES
from experiments.probes import GROUPS, load_probe_file
from experiments.queries import load_query_file
from experiments.results import VERDICTS, read_study
from zoo_fixtures import plain  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
PROBES = ROOT / "configs" / "probes" / "word_order_plain.yaml"
pytestmark = pytest.mark.skipif(not LICENCES.is_dir(), reason=f"{LICENCES} (Debian base-files) is not on this machine")


def test_word_order_on_a_plain_corpus(plain, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "word_order"
    cli(["study", "word_order", "--model", str(plain["gpt2"]), "--data", str(plain["corpus"]), "--queries",
         str(plain["queries"]), "--truncate", "--out", str(out), f"artifacts={tmp_path / 'artifacts'}",
         "influence.progress=false", f"probe_file={PROBES}", "bootstrap_samples=200"])
    assert "fine-tuning extension (not in the paper) needs the synthetic world; skipped" in capsys.readouterr().out
    record = read_study(out)
    assert record.study == "word_order" and record.corpus.columns == ["text"]
    assert record.paper == {"probe_influence": "Figs 24-25"}  # no flipped queries here: one figure
    assert all((out / f).exists() for f in [*record.tables.values(), *record.figures.values()])
    assert "finetune_extension" not in record.tables and "completion_accuracy" not in record.tables

    probes = load_probe_file(PROBES, load_query_file(plain["queries"]))
    queries = list(dict.fromkeys(p.query for p in probes))
    assert queries == ["gpl_warranty", "merchantability"]
    scores = pd.read_csv(out / "probe_scores.csv")
    assert len(scores) == len(probes) and scores["text"].tolist() == [p.text for p in probes]
    assert set(scores["query_set"]) == {"forward"}
    means = pd.read_csv(out / "probe_group_influence.csv")
    assert len(means) == len(GROUPS) * len(queries) * 1  # 6 groups x queries x models
    assert means.groupby("query", sort=False)["group"].apply(list).to_dict() == {q: list(GROUPS) for q in queries}
    contrast = pd.read_csv(out / "flip_contrast.csv")
    assert contrast["query"].tolist() == queries
    verdicts = pd.read_csv(out / "verdicts.csv")
    assert len(verdicts) == 1 and verdicts["verdict"].isin(VERDICTS).all()  # one model, forward queries only
    assert verdicts["claim"].iloc[0] == "flipping the word order sharply reduces influence"


def test_a_plain_corpus_without_probes_is_refused(plain, tmp_path):  # noqa: F811
    with pytest.raises(FileNotFoundError, match="give probe_file=configs/probes/word_order_plain.yaml"):
        cli(["study", "word_order", "--model", str(plain["gpt2"]), "--data", str(plain["corpus"]), "--queries",
             str(plain["queries"]), "--truncate", "--out", str(tmp_path / "run"), f"artifacts={tmp_path / 'a'}"])


def test_probe_files_are_checked(tmp_path):
    queries = load_query_file(ROOT / "configs" / "queries" / "paper.yaml")
    paper = load_probe_file(ROOT / "configs" / "probes" / "word_order_paper.yaml", queries)
    assert {(p.query, p.group) for p in paper} == {(q, g) for q in ("first_president_astrobia", "gleem")
                                                   for g in GROUPS}
    assert ("first_president_astrobia", "order_flipped",
            "Zorald Pfaff was the first President of the Republic of Astrobia") in paper
    bad = tmp_path / "bad.yaml"
    groups = "".join(f"\n      - group: {g}\n        sequences: [text]" for g in GROUPS)
    blank = groups.replace("[text]", "['  ']", 1)
    for body, message in [
        (f"queries:\n  - query: nowhere\n    groups:{groups}", "not in the study's query set"),
        (f"queries:\n  - query: gleem\n    groups:{groups.replace('irrelevant', 'unrelated')}", "has group 'unrelated'"),
        (f"queries:\n  - query: gleem\n    groups:{groups.split('      - group: irrelevant')[0]}", "lacks groups"),
        (f"queries:\n  - query: gleem\n    groups:{blank}", "empty or non-text"),
        (f"queries:\n  - query: gleem\n    prompt: Gleem is\n    groups:{groups}", "make them agree"),
    ]:
        bad.write_text(body)
        with pytest.raises((ValueError, KeyError), match=message):
            load_probe_file(bad, queries)


def test_a_probe_file_can_be_jsonl(tmp_path):
    """The same probes as the paper's YAML file, written one {query, groups} entry per line, load identically."""
    import json

    import yaml

    queries = load_query_file(ROOT / "configs" / "queries" / "paper.yaml")
    entries = yaml.safe_load((ROOT / "configs" / "probes" / "word_order_paper.yaml").read_text())["queries"]
    lines = tmp_path / "probes.jsonl"
    lines.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    assert load_probe_file(lines, queries) == load_probe_file(ROOT / "configs" / "probes" / "word_order_paper.yaml",
                                                              queries)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(entries[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:2 is not valid JSON"):
        load_probe_file(broken, queries)
