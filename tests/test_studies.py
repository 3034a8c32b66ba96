"""Micro versions of the studies: each runs end to end on the micro zoo and writes its tables and verdicts."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

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
    assert set(pd.read_csv(tmp_path / "top_shares.csv")["top_fraction"]) == {0.001, 0.01, 0.1}
    verdicts = pd.read_csv(tmp_path / "verdicts.csv")
    assert verdicts["holds at our scale"].isin(["yes", "no", "inconclusive"]).all()
    assert (tmp_path / "influence_tails.png").exists() and (tmp_path / "README.md").exists()
    scores = pd.read_parquet(tmp_path / "scores.parquet")
    layer_columns = [c for c in scores.columns if c.startswith("layer:")]
    assert len(layer_columns) == 4  # two MLP matrices in each of two layers
    assert (scores[layer_columns].sum(axis=1) - scores["influence"]).abs().max() < 1e-3 * scores["influence"].abs().max()


def test_layerwise(micro_zoo, study_artifacts, tmp_path):  # noqa: F811
    run_study("layerwise", micro_zoo, study_artifacts, tmp_path)
    shares = pd.read_csv(tmp_path / "layer_shares.csv")
    per_query = shares.groupby("query")["share"].sum()
    assert ((per_query - 1).abs() < 1e-4).all()  # shares of the top sequences' influence sum to one per query
    assert set(shares["block"]) == {0, 1}
    verdicts = pd.read_csv(tmp_path / "verdicts.csv")
    assert "needs at least 3 layers" in set(verdicts["statistic"])  # the micro model has two layers
    assert (tmp_path / "layer_profile.png").exists()


def test_word_order(micro_zoo, study_artifacts, tmp_path):  # noqa: F811
    run_study("word_order", micro_zoo, study_artifacts, tmp_path, "finetune.steps=10", "finetune.num_facts=3")
    summary = pd.read_csv(tmp_path / "group_influence.csv")
    assert set(summary["group"]) == {"same fact, same order", "same fact, flipped order",
                                     "other facts, same templates", "unrelated filler"}
    finetune = pd.read_csv(tmp_path / "finetune_extension.csv")
    assert len(finetune) == 3 * 2 and set(finetune["order"]) == {"trained order", "flipped order"}
    verdicts = pd.read_csv(tmp_path / "verdicts.csv")
    assert any("extension (not in the paper)" in claim for claim in verdicts["paper claim"])


@pytest.mark.parametrize("study", ["scale", "crosslingual", "math_code", "roleplay"])
def test_studies_across_sizes(study, micro_zoo, study_artifacts, tmp_path):  # noqa: F811
    """One model here (the micro zoo); the verdicts that need several sizes say so instead of guessing."""
    run_study(study, micro_zoo, study_artifacts, tmp_path)
    verdicts = pd.read_csv(tmp_path / "verdicts.csv")
    assert len(verdicts) >= 1
    assert (tmp_path / "top_sequences.csv").exists() and (tmp_path / "README.md").exists()
    assert list(tmp_path.glob("*.png"))


def test_figures_mode_recomputes_nothing(micro_zoo, tmp_path):  # noqa: F811
    """With INFLUENCE_LAB_FIGURES_ONLY set and no saved scores, a study refuses instead of computing."""
    command = [sys.executable, "-m", "experiments.roleplay", *micro_overrides(micro_zoo, tmp_path / "empty"),
               f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "INFLUENCE_LAB_FIGURES_ONLY": "1"})
    assert result.returncode != 0
    assert "only redraws saved results" in result.stderr


def test_score_cache_key_ignores_progress_bars():
    from omegaconf import OmegaConf

    from experiments.common import config_digest
    from experiments.study import numerical_settings

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="experiment/sparsity")
    quiet = OmegaConf.merge(cfg.influence, {"progress": False})
    assert config_digest(numerical_settings(cfg.influence)) == config_digest(numerical_settings(quiet))
    damped = OmegaConf.merge(cfg.influence, {"damping_factor": 1.0})
    assert config_digest(numerical_settings(cfg.influence)) != config_digest(numerical_settings(damped))


def test_retrained_model_does_not_reuse_cached_scores(micro_zoo, tmp_path):  # noqa: F811
    """Scores and factors are cached per model weights: changed weights under the same name recompute."""
    import dataclasses

    import torch

    from experiments.study import cached_influence, load_study_inputs, study_queries
    from influence_core import model_fingerprint, track_layers

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="experiment/roleplay",
                      overrides=micro_overrides(micro_zoo, tmp_path) + ["influence=identity", "queries.names=[shutdown]",
                                                                        "queries.held_out_order=0"])
    inputs = load_study_inputs("micro", str(micro_zoo.model_path), cfg.data, study_queries(cfg))
    first = cached_influence(inputs, cfg.influence, tmp_path).scores.total.clone()
    assert torch.equal(cached_influence(inputs, cfg.influence, tmp_path).scores.total, first)  # from the cache
    with torch.no_grad():
        for p in inputs.model.parameters():
            p.mul_(1.5)
    retrained = dataclasses.replace(inputs, model_fingerprint=model_fingerprint(track_layers(inputs.model, ["*"])))
    assert retrained.model_fingerprint != inputs.model_fingerprint
    second = cached_influence(retrained, cfg.influence, tmp_path).scores.total
    assert not torch.allclose(second, first)
    assert len(list((tmp_path / "scores" / "micro").iterdir())) == 2
