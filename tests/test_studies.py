"""Micro versions of the studies: each runs end to end on the micro zoo and writes its tables and verdicts."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from experiments.results import VERDICTS, read_rows, read_study
from zoo_fixtures import micro_zoo, study_artifacts  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def micro_overrides(zoo, artifacts: Path) -> list[str]:
    return ["models=[micro]", f"+model_paths.micro={zoo.model_path}", "data=world_micro",
            f"data.path={zoo.dataset_path}", f"data.queries={zoo.queries_path}", "data.max_length=256",
            "data.truncation=true", f"artifacts={artifacts}", "figures_dir=null", "influence.progress=false"]


def run_study(study: str, zoo, artifacts: Path, run_dir: Path, *overrides: str) -> None:
    """Compose the study's Hydra config with the micro overrides and run it in this process (no import cost)."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name=f"experiment/{study}", overrides=micro_overrides(zoo, artifacts) + list(overrides))
    importlib.import_module(f"experiments.{study}").run(cfg, run_dir)


def test_sparsity(micro_zoo, study_artifacts, tmp_path):  # noqa: F811
    run_study("sparsity", micro_zoo, study_artifacts, tmp_path, "bootstrap_samples=50")
    fits = pd.read_csv(tmp_path / "power_law_fits.csv")
    assert len(fits) >= 25 and fits["alpha"].between(1, 10).all()
    assert set(fits["candidates"]) == {"unfiltered", "tfidf"}  # Fig 8: both candidate sets
    assert {f"R_vs_{alt}" for alt in ("exponential", "lognormal", "stretched_exponential", "truncated_power_law")} \
        <= set(fits.columns)  # Table 1: the power law against other tails
    assert not (tmp_path / "duplicate_queries.csv").exists()  # world v2 has no query under two names (v1 had 8)
    assert set(pd.read_csv(tmp_path / "top_shares.csv")["top_fraction"]) == {0.001, 0.01, 0.1}
    verdicts = pd.read_csv(tmp_path / "verdicts.csv")
    assert verdicts["verdict"].isin(VERDICTS).all()
    assert (tmp_path / "influence_tails.png").exists() and (tmp_path / "README.md").exists()
    scores = pd.read_parquet(tmp_path / "scores.parquet")
    layer_columns = [c for c in scores.columns if c.startswith("layer:")]
    assert len(layer_columns) == 4  # two MLP matrices in each of two layers
    assert (scores[layer_columns].sum(axis=1) - scores["influence"]).abs().max() < 1e-3 * scores["influence"].abs().max()

    record = read_study(tmp_path)  # the result contract: every table and figure it names exists
    assert record.study == "sparsity" and [m.name for m in record.models] == ["micro"]
    assert record.models[0].architecture == "GPTNeoXForCausalLM" and record.models[0].non_embedding_parameters > 0
    assert record.corpus.num_sequences == len(scores) // len(record.queries)
    assert {"queries", "top_sequences", "verdicts", "power_law_fits"} <= set(record.tables)
    assert all(row["n_models"] == 1 and row["n_seeds"] == 1 for row in record.verdicts)
    top = read_rows(tmp_path / record.tables["top_sequences"])
    assert {"model", "query", "rank", "train_id", "influence", "text", "tokens", "token_scores", "spurious"} <= set(top)
    first = top.iloc[0]
    assert "".join(first["tokens"]) == first["text"][: len("".join(first["tokens"]))]
    assert abs(sum(first["token_scores"]) - first["influence"]) < 1e-3 * abs(first["influence"]) + 1e-6
    # influence per unit epsilon and per added copy (epsilon = 1/N, N the training sequences)
    assert np.allclose(top["influence_per_copy"] * record.corpus.num_sequences, top["influence"])

def test_layerwise(micro_zoo, study_artifacts, tmp_path):  # noqa: F811
    run_study("layerwise", micro_zoo, study_artifacts, tmp_path)
    shares = pd.read_csv(tmp_path / "layer_shares.csv")
    per_query = shares.groupby("query")["share"].sum()
    assert ((per_query - 1).abs() < 1e-4).all()  # shares of the top sequences' influence sum to one per query
    assert set(shares["block"]) == {0, 1}
    verdicts = pd.read_csv(tmp_path / "verdicts.csv")
    assert "needs at least 3 layers" in set(verdicts["statistic"])  # the micro model has two layers
    assert (tmp_path / "layer_profile.png").exists()
    counts = pd.read_csv(tmp_path / "spurious_counts.csv")  # the spurious rule applied to the counted top 50
    assert set(shares["query"]) <= set(counts["query"]) and (counts["kept"] <= 50).all()
    assert (counts["candidates"] == 75).all() and (counts["kept"] + counts["flagged"] <= 75).all()
    flagged = pd.read_csv(tmp_path / "flagged_spurious.csv")
    assert len(flagged) == counts["flagged"].sum() and flagged["spurious"].astype(bool).all()


def test_word_order(micro_zoo, study_artifacts, tmp_path):  # noqa: F811
    """The paper's probe protocol on the micro zoo: probes generated from the world's facts for every word-order
    query, forward and flipped apart, scored outside the training set; plus the fine-tuning extension."""
    run_study("word_order", micro_zoo, study_artifacts, tmp_path, "finetune.steps=10", "finetune.num_facts=3",
              "bootstrap_samples=200")
    groups = ["rewordings", "name_removed", "meaning_changed", "irrelevant", "order_flipped",
              "flipped_relation_removed"]
    scores = pd.read_csv(tmp_path / "probe_scores.csv")
    word_order = {q.name: q for q in micro_zoo.queries if q.study == "word_order"}
    queries = list(dict.fromkeys(scores["query"]))
    assert len(queries) == 12 and set(queries) <= set(word_order)  # 4 forward, 4 flipped, 4 seen only flipped
    assert set(scores["query_set"]) == {"forward", "flipped", "forward, seen only flipped"}
    assert np.isfinite(scores["influence"]).all()
    means = pd.read_csv(tmp_path / "probe_group_influence.csv")
    assert len(means) == 6 * len(queries) * 1  # 6 groups x queries x models
    assert means.groupby("query", sort=False)["group"].apply(list).to_dict() == {q: groups for q in queries}
    counts = scores.groupby(["query", "group"]).size().rename("count").reset_index()
    assert (means.merge(counts, on=["query", "group"]).eval("n_probes == count")).all()
    # rewordings of the forward query of fact 0 are the paper's own sentence
    assert "The first President of the Republic of Astrobia was Zorald Pfaff" in set(
        scores[(scores["query"] == "word_order_F0000_forward") & (scores["group"] == "rewordings")]["text"])
    contrast = pd.read_csv(tmp_path / "flip_contrast.csv")
    assert len(contrast) == len(queries)
    assert np.allclose(contrast["difference"], contrast["rewordings_mean"] - contrast["flipped_mean"])
    verdicts = pd.read_csv(tmp_path / "verdicts.csv")
    sharp = verdicts[verdicts["claim"] == "flipping the word order sharply reduces influence"]
    assert sharp["verdict"].isin(VERDICTS).all()
    assert (sharp["facts"] == "all facts").sum() == 3  # forward, seen only flipped, flipped: apart
    known = json.loads((Path(micro_zoo.model_path).parent / "known_facts.json").read_text())
    known_queries = [q for q in queries if known.get(word_order[q].fact_ids[0], 0.0) >= 0.66]  # forward facts only
    known_rows = sharp[sharp["facts"].str.startswith("facts the model knows")]
    assert known_rows["n_model_queries"].sum() == len(known_queries)  # the same verdicts on the known facts only
    assert any("extension (not in the paper)" in claim for claim in verdicts["claim"])
    finetune = pd.read_csv(tmp_path / "finetune_extension.csv")
    assert len(finetune) == 3 * 2 and set(finetune["order"]) == {"trained order", "flipped order"}
    record = read_study(tmp_path)
    assert record.paper["probe_influence"] == "Figs 24-25" and (tmp_path / "probe_influence.png").exists()
    assert (tmp_path / "probe_influence_flipped.png").exists()
    assert {"probes", "probe_scores", "probe_group_influence", "flip_contrast", "verdicts"} <= set(record.tables)


def test_word_order_with_the_papers_probes(micro_zoo, study_artifacts, tmp_path):  # noqa: F811
    """The paper's own probes (Figs 24-25) on the zoo: its queries are the world's first president and first
    substance, asked in the paper's words."""
    run_study("word_order", micro_zoo, study_artifacts, tmp_path, "probe_file=configs/probes/word_order_paper.yaml",
              f"queries.path={ROOT / 'configs' / 'queries' / 'paper.yaml'}",
              "queries.names=[first_president_astrobia,gleem]", "finetune.enabled=false", "bootstrap_samples=200")
    means = pd.read_csv(tmp_path / "probe_group_influence.csv")
    assert len(means) == 6 * 2 and set(means["query"]) == {"first_president_astrobia", "gleem"}
    assert (means.groupby("query")["n_probes"].sum() == pd.Series({"first_president_astrobia": 21, "gleem": 22})).all()
    assert "finetune_extension" not in read_study(tmp_path).tables


@pytest.mark.parametrize("study", ["scale", "math_code", "roleplay"])
def test_studies_across_sizes(study, micro_zoo, study_artifacts, tmp_path):  # noqa: F811
    """One model here (the micro zoo); the verdicts that need several sizes say so instead of guessing."""
    run_study(study, micro_zoo, study_artifacts, tmp_path)
    verdicts = pd.read_csv(tmp_path / "verdicts.csv")
    assert len(verdicts) >= 1
    assert (tmp_path / "top_sequences.jsonl").exists() and (tmp_path / "README.md").exists()
    assert list(tmp_path.glob("*.png"))
    assert read_study(tmp_path).study == study
    if study in WORLD_TABLES:
        check_abstraction_outputs(study, tmp_path)


# The abstraction studies' own tables on the synthetic world (ours), beside the corpus-agnostic ones.
WORLD_TABLES = {"scale": ("top_sequence_relations", "relation_shares"),
                "math_code": ("top_sequence_categories", "category_shares"),
                "roleplay": ("top_sequence_kinds", "influence_share_by_kind")}


def check_abstraction_outputs(study: str, run_dir: Path) -> None:
    """Corpus-agnostic statistics of the zoo's query selection, the spurious rule, and the world's rows (ours)."""
    record = read_study(run_dir)
    assert {"abstraction_per_query", "abstraction_by_model", "flagged_spurious", "spurious_counts",
            *WORLD_TABLES[study]} <= set(record.tables)
    assert "top_sequences_by_size" in record.figures and record.paper["top_sequences_by_size"].startswith("Sec 5.3")
    per_query = pd.read_csv(run_dir / "abstraction_per_query.csv")
    studies = {"scale": {"facts", "math", "code", "roleplay", "cross_lingual"}, "math_code": {"math", "code"},
               "roleplay": {"roleplay"}}[study]
    assert len(per_query) and set(per_query["study"]) <= studies  # the zoo's selection, as before
    counts = pd.read_csv(run_dir / "spurious_counts.csv")
    assert counts["flagged"].sum() == len(pd.read_csv(run_dir / "flagged_spurious.csv"))
    world = pd.read_csv(run_dir / f"{WORLD_TABLES[study][0]}.csv")
    kept = {(q, int(i)) for q, ids in zip(per_query["query"], per_query["top_train_ids"].fillna("").astype(str))
            for i in ids.split()}
    assert set(zip(world["query"], world["train_id"].astype(int))) == kept  # the world's rows count the same sequences
    verdicts = pd.read_csv(run_dir / "verdicts.csv")
    trends = verdicts[verdicts["scope"].str.startswith("across")]
    assert len(trends) >= 3 and (trends["verdict"] == "underpowered").all()  # one model, one seed
    assert verdicts["claim"].str.startswith("ours (synthetic world)").any()


def test_crosslingual(micro_zoo, study_artifacts, tmp_path):  # noqa: F811
    """The paper's protocol on the micro zoo with the world's renderings (world v2: every document): a 3 x 10 table
    per query, every top sequence translated, verdicts that need sizes underpowered."""
    from experiments.zoo.translations import write_translations

    rendered = write_translations(micro_zoo.dataset_path, tmp_path / "translations.jsonl")
    assert rendered.rendered > 0 and rendered.untranslatable == []
    run_study("crosslingual", micro_zoo, study_artifacts, tmp_path / "run", f"translation.file={rendered.path}",
              "bootstrap_samples=200")
    out = tmp_path / "run"
    heatmap = pd.read_csv(out / "crosslingual_heatmap_table.csv")
    for _, table in heatmap.groupby(["model", "query"]):
        assert table["language"].tolist() == ["en", "ko", "tr"]
        assert table.drop(columns=["model", "parameters", "query", "language"]).shape == (3, 10)
    coverage = pd.read_csv(out / "crosslingual_coverage.csv")
    assert (coverage["sequences"] == 10).all()
    assert set(coverage["query"]) >= {"fact_F0000_heldout", "shutdown"}  # the English fact queries and shutdown
    assert (coverage["translated_ko"] == coverage["sequences"]).all()  # every document has a rendering
    sequences = read_rows(out / "crosslingual_sequences.jsonl")
    english = sequences[sequences["language"] == "en"]
    assert (english["influence"] - english["corpus_score"]).abs().max() < 1e-3 * english["influence"].abs().max()
    verdicts = pd.read_csv(out / "verdicts.csv")
    assert verdicts["verdict"].isin(VERDICTS).all()
    assert (verdicts["facts"] == "all facts").sum() == 4  # near zero at the smallest size, rising: ko and tr
    assert len(verdicts) == 8 and verdicts["facts"].str.startswith("facts the model knows").sum() == 4
    assert (verdicts[verdicts["claim"].str.contains("rises with model size")]["verdict"] == "underpowered").all()
    record = read_study(out)
    assert record.study == "crosslingual" and record.paper["crosslingual_heatmaps_shutdown"] == "Figs 15-16"
    assert "renders every document in Korean and Turkish" in (out / "README.md").read_text()


def test_translations_are_scored_whole_up_to_the_context_unless_the_corpus_was_cut():
    """A translation may take more tokens than its source (the zoo v2 run failed on 12 Korean renderings over the
    corpus's 256): an uncut corpus scores them up to the model's context, a cut one cuts them at its length."""
    from omegaconf import OmegaConf

    from experiments.crosslingual import rescored_max_length

    assert rescored_max_length(512, OmegaConf.create({"max_length": 256, "truncation": False})) == 512
    assert rescored_max_length(512, OmegaConf.create({"max_length": 256, "truncation": True})) == 256
    assert rescored_max_length(128, OmegaConf.create({"max_length": 256, "truncation": True})) == 128
    assert rescored_max_length(512, OmegaConf.create({"max_length": None, "truncation": True})) == 512


def test_figures_mode_recomputes_nothing(micro_zoo, tmp_path):  # noqa: F811
    """With compute=false and no saved scores, a study refuses instead of computing."""
    command = [sys.executable, "-m", "experiments.roleplay", *micro_overrides(micro_zoo, tmp_path / "empty"),
               f"hydra.run.dir={tmp_path / 'run'}", "compute=false"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "compute=false only reads saved results" in result.stderr


def test_score_cache_key_ignores_progress_bars():
    from omegaconf import OmegaConf

    from experiments.pipeline import cache_key, numerical_settings

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="experiment/sparsity")
    quiet = OmegaConf.merge(cfg.influence, {"progress": False})
    assert cache_key(numerical_settings(cfg.influence)) == cache_key(numerical_settings(quiet))
    damped = OmegaConf.merge(cfg.influence, {"damping_factor": 1.0})
    assert cache_key(numerical_settings(cfg.influence)) != cache_key(numerical_settings(damped))


def test_retrained_model_does_not_reuse_cached_scores(micro_zoo, tmp_path):  # noqa: F811
    """Scores and factors are cached per model weights: changed weights under the same name recompute."""
    import torch
    from omegaconf import OmegaConf

    from experiments.study import cached_influence, load_study_inputs, study_queries
    from influence_core import model_fingerprint, track_layers

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="experiment/roleplay",
                      overrides=micro_overrides(micro_zoo, tmp_path) + ["influence=identity", "queries.names=[shutdown]",
                                                                        "queries.held_out_order=0"])
    model = OmegaConf.create({"name_or_path": str(micro_zoo.model_path)})
    inputs = load_study_inputs("micro", model, cfg.data, study_queries(cfg))
    first = cached_influence(inputs, cfg).scores.total.clone()
    assert torch.equal(cached_influence(inputs, cfg).scores.total, first)  # from the cache
    with torch.no_grad():
        for p in inputs.model.parameters():
            p.mul_(1.5)
    before = inputs.loaded.fingerprint
    inputs.loaded.fingerprint = model_fingerprint(track_layers(inputs.model, ["*"]))
    assert inputs.loaded.fingerprint != before
    second = cached_influence(inputs, cfg).scores.total
    assert not torch.allclose(second, first)
    assert len(list((tmp_path / "scores" / "micro").iterdir())) == 2


def test_memorisation(micro_zoo, study_artifacts, tmp_path):  # noqa: F811
    run_study("memorisation", micro_zoo, study_artifacts, tmp_path)
    table = pd.read_csv(tmp_path / "passage_coverage.csv")
    assert {"shutdown", "ordinary_dialogue"} <= set(table["query"])  # the focus queries the zoo has
    assert table["top1_coverage"].between(0, 1).all() and table["max_coverage_top_k"].ge(table["top1_coverage"]).all()
    assert read_study(tmp_path).figures == {"contains_passage": "contains_passage.png"}


def test_a_study_under_torchrun_scores_on_two_ranks(micro_zoo, study_artifacts, tmp_path):  # noqa: F811
    """torchrun: the two ranks fit and score the corpus shards together, rank 0 alone writes the study; its
    scores equal one process's to float32 rounding (the DDP tolerance of tests/test_distributed.py)."""
    overrides = [o for o in micro_overrides(micro_zoo, tmp_path / "artifacts")] + [
        "bootstrap_samples=20", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "experiments.sparsity", *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    shards = list((tmp_path / "artifacts" / "scores" / "micro").glob("*/shards/manifest.json"))
    assert len(shards) == 1 and "rank 1" not in done.stdout  # one corpus's shards; rank 0 printed alone
    run_study("sparsity", micro_zoo, study_artifacts, tmp_path / "single", "bootstrap_samples=20")
    two = pd.read_parquet(tmp_path / "run" / "scores.parquet")
    one = pd.read_parquet(tmp_path / "single" / "scores.parquet")
    assert list(two["query"]) == list(one["query"]) and list(two["train_index"]) == list(one["train_index"])
    scale = one["influence"].abs().max()
    assert (two["influence"] - one["influence"]).abs().max() <= 1e-5 * scale
    assert read_study(tmp_path / "run").study == "sparsity"


def test_size_groups_pool_only_distinct_seeds_of_one_shape():
    from types import SimpleNamespace as R

    from experiments.study import size_groups

    records = [R(name="l_s0", architecture="GPTNeoX", non_embedding_parameters=900, seed=0),
               R(name="s_s0", architecture="GPTNeoX", non_embedding_parameters=100, seed=0),
               R(name="s_s1", architecture="GPTNeoX", non_embedding_parameters=100, seed=1),
               R(name="llama", architecture="Llama", non_embedding_parameters=100, seed=0),  # same count, other shape
               R(name="a", architecture="GPT2", non_embedding_parameters=500, seed=None),  # seeds unknown: apart
               R(name="b", architecture="GPT2", non_embedding_parameters=500, seed=None)]
    assert size_groups(records) == [("2 seeds of GPTNeoX 100 (s_s0, s_s1)", ["s_s0", "s_s1"]),
                                    ("llama", ["llama"]), ("a", ["a"]), ("b", ["b"]), ("l_s0", ["l_s0"])]


def test_a_zoo_size_runs_once_per_training_seed():
    """seeds=[0, 2]: configs/model/zoo_xs.yaml becomes two runs, each loading its seed's folder and recording the
    seed (so size_groups pools them); a model given by path runs once; a config without `seed` is refused."""
    from omegaconf import OmegaConf

    from experiments.study import model_runs

    cfg = OmegaConf.create({"models": ["zoo_xs", "mine"], "seeds": [0, 2], "model_paths": {"mine": "/models/mine"}})
    runs = model_runs(cfg)
    assert [name for name, _ in runs] == ["zoo_xs_s0", "zoo_xs_s2", "mine"]
    assert [m.name_or_path for _, m in runs] == ["artifacts/zoo/zoo_xs/seed0/model", "artifacts/zoo/zoo_xs/seed2/model",
                                                 "/models/mine"]
    assert [m.get("seed") for _, m in runs] == [0, 2, None]
    with pytest.raises(ValueError, match="has no `seed`"):
        model_runs(OmegaConf.create({"models": ["pythia-70m"], "seeds": [0, 1]}))
    assert [name for name, _ in model_runs(OmegaConf.create({"models": ["pythia-70m"], "seeds": None}))] == \
        ["pythia-70m"]
