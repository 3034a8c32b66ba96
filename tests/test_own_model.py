"""Your own model and corpus: the console command on non-zoo models (GPT-2, Llama) and a text-only corpus.

The plain testbed (experiments/plain.py) is built once per session at its micro size: the licence texts Debian
ships as a corpus with only a `text` column, and two architectures built from configs and trained briefly.
"""

from __future__ import annotations

import json

import pandas as pd
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.cli import main as cli
from experiments.plain import LICENCES
from experiments.queries import load_query_file
from experiments.results import VERDICTS, read_rows, read_study
from zoo_fixtures import plain  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not LICENCES.is_dir(), reason=f"{LICENCES} (Debian base-files) is not on this machine")


def inputs(plain, model: str = "gpt2") -> list[str]:
    return ["--model", str(plain[model]), "--data", str(plain["corpus"]), "--queries", str(plain["queries"]),
            "--truncate"]


def test_corpus_has_only_a_text_column(plain):  # noqa: F811
    rows = [json.loads(line) for line in plain["corpus"].read_text().splitlines()]
    assert len(rows) == 80 + 20 and all(set(r) == {"text"} and r["text"] for r in rows)
    translations = [json.loads(line) for line in plain["translations"].read_text().splitlines()]
    assert [t["text"] for t in translations] == [r["text"] for r in rows]  # every corpus text is listed
    assert all(t["ko"] is None and t["tr"] is None for t in translations[:80])  # licences: none installed
    messages = translations[80:]
    hangul = [t for t in messages if any("\uac00" <= c <= "\ud7a3" for c in t["ko"])]
    assert len(hangul) >= 15 and all(t["tr"] != t["text"] for t in messages)


def test_score_own_model_writes_the_contract(plain, tmp_path):
    out = tmp_path / "score"
    cli(["score", *inputs(plain), "--out", str(out), f"artifacts={tmp_path / 'artifacts'}", "influence.progress=false",
         "top_k=5"])
    record = read_study(out)
    assert record.study == "score" and record.models[0].architecture == "GPT2LMHeadModel"
    assert record.corpus.columns == ["text"] and record.corpus.num_sequences == 100
    assert record.queries == [q.name for q in load_query_file(plain["queries"])]  # every query, none dropped
    assert record.command.startswith("influence-lab score --model")
    top = read_rows(out / record.tables["top_sequences"])
    assert len(top) == 5 * len(record.queries)
    layers = [c for c in top if c.startswith("layer:")]
    assert len(layers) == 4  # c_fc and c_proj of two blocks (GPT-2's Conv1D MLP)
    assert (top[layers].sum(axis=1) - top["influence"]).abs().max() < 1e-3 * top["influence"].abs().max()
    assert (top.groupby("query")["influence"].apply(lambda s: s.is_monotonic_decreasing)).all()
    # a rerun reuses the cached factors and shards: same numbers, nothing refitted
    cli(["score", *inputs(plain), "--out", str(tmp_path / "again"), f"artifacts={tmp_path / 'artifacts'}",
         "influence.progress=false", "top_k=5"])
    again = read_rows(tmp_path / "again" / "top_sequences.jsonl")
    assert again["influence"].tolist() == top["influence"].tolist()
    assert len(list((tmp_path / "artifacts" / "factors" / "gpt2").iterdir())) == 1


@pytest.mark.parametrize("study", ["sparsity", "layerwise", "memorisation"])
def test_studies_on_a_llama_and_a_plain_corpus(study, plain, tmp_path):
    out = tmp_path / study
    cli(["study", study, *inputs(plain, "llama"), "--out", str(out), f"artifacts={tmp_path / 'artifacts'}",
         "influence.progress=false", "bootstrap_samples=20" if study == "sparsity" else "top_k=20"])
    record = read_study(out)
    assert record.study == study and record.models[0].architecture == "LlamaForCausalLM"
    assert record.verdicts and all(v["verdict"] in VERDICTS for v in record.verdicts)
    assert all((out / f).exists() for f in [*record.tables.values(), *record.figures.values()])
    if study == "layerwise":  # Fig 4: the layer x token map of each query's top sequence sums to its scores
        margins = pd.read_csv(out / "layer_token_map_margins.csv")
        top = read_rows(out / record.tables["top_sequences"])
        for query, rows in margins.groupby("query"):
            first = top[(top["query"] == query) & (top["spurious"] != True)].iloc[0]  # noqa: E712
            layers = [c for c in top if c.startswith("layer:")]
            assert rows["influence"].to_numpy() == pytest.approx(first[layers].to_numpy(dtype=float), rel=1e-3,
                                                                  abs=1e-4 * abs(first["influence"]))


def test_report_renders_a_score_run(plain, tmp_path):
    out = tmp_path / "score"
    cli(["score", *inputs(plain), "--out", str(out), f"artifacts={tmp_path / 'artifacts'}", "influence.progress=false"])
    cli(["report", str(out), "--out", str(tmp_path / "site"), "--screenshot", ""])
    pages = list((tmp_path / "site").rglob("queries/*/*.html"))
    assert len(pages) == len(read_study(out).queries)
    assert "Influential Sequence for gpt2" in pages[0].read_text()


def run_score(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.cli", "score", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--data", "corpus.jsonl"], "missing model.name_or_path"),
    (["--micro-zoo", "--model", "m"], "micro_zoo=true scores the micro zoo; do not also give"),
    (["influence.damping_factor=abc"], "influence.damping_factor='abc'"),
    (["influence.score_batch_size=0"], "influence.score_batch_size=0"),
    (["shard_size=-1"], "shard_size=-1"),
    (["query_rank=0"], "query_rank=0"),
])
def test_bad_settings_are_refused_before_any_computation(args, message, tmp_path):
    """A partial set of paths or a bad value: one line naming it, in seconds, before a model is loaded."""
    result = run_score(*args, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr.strip().splitlines()[-1]


def test_long_sequences_are_refused_unless_truncation_is_asked(plain, tmp_path):
    args = ["score", "--model", str(plain["gpt2"]), "--data", str(plain["corpus"]), "--queries",
            str(plain["queries"]), "--max-length", "16", "--out", str(tmp_path / "run"),
            f"artifacts={tmp_path / 'artifacts'}"]
    with pytest.raises(ValueError, match=r"more than max_length=16 \(\d+ sequences are too long\)"):
        cli(args)


def test_query_files_in_every_format(tmp_path, capsys):
    rows = [{"name": "water", "prompt": "Water is composed of", "completion": " hydrogen and oxygen."},
            {"name": "gpl", "prompt": "This program is", "completion": " free software"}]
    (tmp_path / "q.json").write_text(json.dumps(rows))
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "q.yaml").write_text("queries:\n" + "".join(
        f"  - {{name: {r['name']}, prompt: '{r['prompt']}', completion: '{r['completion']}'}}\n" for r in rows))
    for suffix in ("json", "jsonl", "yaml"):
        loaded = load_query_file(tmp_path / f"q.{suffix}")
        assert [(q.name, q.prompt, q.completion, q.study) for q in loaded] == \
            [(r["name"], r["prompt"], r["completion"], "") for r in rows]
    assert [q.name for q in load_query_file(tmp_path / "q.json", ["gpl"])] == ["gpl"]
    (tmp_path / "dup.json").write_text(json.dumps(rows + rows[:1]))
    with pytest.raises(ValueError, match="'water' appears twice"):
        load_query_file(tmp_path / "dup.json")
    (tmp_path / "bad.json").write_text(json.dumps([{"name": "x", "prompt": "p"}]))
    with pytest.raises(ValueError, match=r"lacks \['completion'\]"):
        load_query_file(tmp_path / "bad.json")
    (tmp_path / "typo.json").write_text(json.dumps([{**rows[0], "complet": "x"}]))
    with pytest.raises(ValueError, match=r"unknown fields \['complet'\]"):
        load_query_file(tmp_path / "typo.json")
    (tmp_path / "paper.yaml").write_text("queries:\n  - {name: a, prompt: p, completion: ' c'}\n"
                                         "  - {name: b, prompt: null, completion: null, text_found: false, note: n}\n")
    assert [q.name for q in load_query_file(tmp_path / "paper.yaml")] == ["a"]
    assert "left out: b" in capsys.readouterr().out


def test_console_command_has_help():
    for command in (["--help"], ["score", "--help"], ["study", "--help"]):
        result = subprocess.run([sys.executable, "-m", "experiments.cli", *command], cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0 and "usage: influence-lab" in result.stdout


def test_sequences_outside_the_corpus_score_like_corpus_rows(plain, tmp_path):
    """Probe sequences (not in training) are scored with the corpus's factors; a probe equal to a corpus row gets
    that row's score, so probes and training sequences are on one scale."""
    from omegaconf import OmegaConf

    from experiments import pipeline
    from experiments.cli import compose

    cfg = compose("experiment/score", ["influence.progress=false"])
    loaded = pipeline.load_model("gpt2", plain["gpt2"])
    corpus = pipeline.load_corpus(plain["corpus"], loaded.tokenizer, 256, truncation=True)
    queries = load_query_file(plain["queries"])[:2]
    scoring = pipeline.ScoringSettings(query_rank=None, top_k_tokens=0)
    full = pipeline.score_model(loaded, corpus, queries, cfg.influence, scoring, tmp_path, progress=False)
    probes = pipeline.corpus_from_texts([corpus.texts[3], "An unrelated probe about the weather."], loaded.tokenizer,
                                        256, "probes")
    scored = pipeline.score_model(loaded, corpus, queries, OmegaConf.create(cfg.influence), scoring, tmp_path,
                                  progress=False, scored=probes)
    assert scored.num_sequences == 2 and scored.factors_dir == full.factors_dir
    assert len(list((tmp_path / "factors" / "gpt2").iterdir())) == 1  # the corpus's factors, fitted once
    scale = abs(full.matrix()).max()  # float32 rounding differs with the batch's padding width
    assert scored.matrix()[:, 0] == pytest.approx(full.matrix()[:, 3], abs=1e-5 * scale)


def test_studies_with_other_top_k_tokens_share_the_dense_scores(plain, tmp_path):
    """top_k_tokens is not in the shards' cache key: another k re-scores only each query's top k sequences (token
    pass), the dense shards are untouched, and top_sequences gets token scores for exactly its top k rows."""
    from experiments import pipeline
    from experiments.cli import compose
    from influence_core.sharding import token_folder

    cfg = compose("experiment/score", ["influence.progress=false"])
    loaded = pipeline.load_model("gpt2", plain["gpt2"])
    corpus = pipeline.load_corpus(plain["corpus"], loaded.tokenizer, 256, truncation=True)
    queries = load_query_file(plain["queries"])[:2]
    runs = {}
    for top_k in (0, 3, 5):
        scoring = pipeline.ScoringSettings(query_rank=None, top_k_tokens=top_k)
        runs[top_k] = pipeline.score_model(loaded, corpus, queries, cfg.influence, scoring, tmp_path, progress=False)
        if top_k == 0:
            shards = runs[0].scores_dir / "shards"
            written = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard_*.parquet")}
    assert len({run.scores_dir for run in runs.values()}) == 1  # one dense cache for every k
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("shard_*.parquet")} == written
    assert (token_folder(shards, 3) / "manifest.json").exists() and (token_folder(shards, 5) / "manifest.json").exists()
    dense = runs[0].frame.drop(columns="token_scores")
    for top_k in (3, 5):
        assert runs[top_k].frame.drop(columns="token_scores").equals(dense)
        assert runs[top_k].frame["token_scores"].notna().sum() == len(queries) * top_k
        top = pipeline.top_sequences(runs[top_k], corpus, top_k + 2)
        with_tokens = top["token_scores"].notna()
        assert (with_tokens == (top["rank"] <= top_k)).all()
        for row in top[with_tokens].itertuples():
            assert sum(row.token_scores) == pytest.approx(row.influence, rel=1e-4, abs=1e-6)
    saved = pipeline.saved_model_scores(loaded, corpus, queries, cfg.influence,
                                        pipeline.ScoringSettings(query_rank=None, top_k_tokens=5), tmp_path)
    assert saved.frame["token_scores"].notna().sum() == len(queries) * 5
    with pytest.raises(FileNotFoundError, match="top_k_tokens=4.*compute=true"):
        pipeline.saved_model_scores(loaded, corpus, queries, cfg.influence,
                                    pipeline.ScoringSettings(query_rank=None, top_k_tokens=4), tmp_path)


@pytest.mark.parametrize("study", list(__import__("experiments.cli", fromlist=["STUDIES"]).STUDIES))
def test_every_study_runs_as_a_module(study):
    """`python -m experiments.<study>` reaches its Hydra app (a module without its __main__ call runs nothing)."""
    result = subprocess.run([sys.executable, "-m", f"experiments.{study}", "--cfg", "job"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "figures_dir:" in result.stdout, result.stderr[-1000:]
