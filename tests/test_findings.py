"""FINDINGS.md from committed results: hand-made study.json, zoo summary and zoo v1 verdicts with known content."""

import pandas as pd
import yaml

from experiments.findings import BEGIN, END, write_findings
from experiments.results import CorpusRecord, ModelRecord, StudyRecord, verdict_row, write_study


def test_findings_tables_come_from_study_json_and_keep_the_prose(tmp_path):
    figures = tmp_path / "figures"
    (figures / "zoo").mkdir(parents=True)
    pd.DataFrame([{"size": s, "seed": k, "non_embedding_params": p, "competence": c, "competence_all_facts": c,
                   "heldout_loss": 0.6} for s, p, cs in (("a", 10, (0.2, 0.4)), ("b", 100, (0.8, 0.9)))
                  for k, c in enumerate(cs)]).to_csv(figures / "zoo" / "zoo_summary.csv", index=False)
    build = tmp_path / "build.yaml"
    build.write_text(yaml.safe_dump({"competence_bar": {"largest_at_least": 0.8, "rising_with_size": True}}))
    record = StudyRecord("sparsity", [ModelRecord("a_s0", "p", "X", 10, 0)], CorpusRecord("c", "f", ["text"], 3), [],
                         {}, verdicts=[verdict_row("tails follow a power law", "share plausible", 0.75, "holds",
                                                   ci_low=0.6, ci_high=0.9, n_models=2, n_seeds=2, threshold=0.5,
                                                   facts="all facts")], command="make sparsity")
    (figures / "sparsity").mkdir()
    write_study(figures / "sparsity", record)
    (figures / "zoo_v1" / "sparsity").mkdir(parents=True)
    pd.DataFrame([{"paper claim": "old claim", "statistic": "s", "measured": 0.45, "uncertainty": "",
                   "holds at our scale": "no"}]).to_csv(figures / "zoo_v1" / "sparsity" / "verdicts.csv", index=False)
    previous = StudyRecord("sparsity", [ModelRecord("a_s0", "p", "X", 10, 0)], CorpusRecord("c", "f", ["text"], 3), [],
                           {}, verdicts=[verdict_row("tails follow a power law", "share plausible", 0.41,
                                                     "does not hold", ci_low=0.36, ci_high=0.46, n_models=2,
                                                     n_seeds=2, threshold=0.5, facts="all facts"),
                                         verdict_row("a claim v3 dropped", "s", 0.1, "holds", p_value=0.01, n_models=1, n_seeds=1,
                                                     facts="all facts")],
                           command="make sparsity")
    (figures / "zoo_v2" / "sparsity").mkdir(parents=True)
    write_study(figures / "zoo_v2" / "sparsity", previous)
    findings = tmp_path / "FINDINGS.md"
    findings.write_text(f"# Findings\n\nhand-written decisions\n\n{BEGIN}\nold table\n{END}\n\nclosing prose\n")
    text = write_findings(findings, figures=figures, build_config=build, studies=("sparsity", "layerwise")).read_text()
    assert "hand-written decisions" in text and "closing prose" in text and "old table" not in text
    assert "| tails follow a power law | all facts | share plausible | 0.75 [0.6, 0.9] |  | 2 x 2 | 0.5 |" in text
    assert "**holds**" in text and "Verdicts over all studies: 1 holds." in text
    assert "The bar is met: largest size 0.850" in text and "| a | 10 | 2 | 0.300 (0.200-0.400)" in text
    assert "| old claim | 0.45 | no |" in text
    assert "Not run: no figures/layerwise/study.json" in text
    assert "1 of the 1 rows measured on both zoos changed verdict." in text
    assert "| 1 | tails follow a power law | all facts | 0.41 [0.36, 0.46] | does not hold | holds |" in text
    assert "|  | a claim v3 dropped | all facts | 0.1 | holds | (not in v3) |" in text


def test_change_table_pairs_repeated_claims_in_order():
    from experiments.findings import change_table

    def row(estimate, verdict):
        return {"claim": "c", "facts": "all facts", "estimate": estimate, "verdict": verdict}

    table = change_table([row(1.0, "holds"), row(2.0, "holds")], [row(0.5, "holds"), row(0.7, "underpowered")])
    assert table.startswith("1 of the 2 rows measured on both zoos changed verdict.")
    assert "| 1 | c | all facts | 0.5 | holds | holds |" in table
    assert "| 2 | c | all facts | 0.7 | underpowered | holds |" in table
