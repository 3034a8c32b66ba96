"""Sweeps over models the Hydra way: `-m` runs one scoring job per model through a launcher (joblib here;
hydra-submitit-launcher on SLURM), then stage=gather draws the cross-model figures from the saved scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.plain import LICENCES
from zoo_fixtures import plain  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not LICENCES.is_dir(), reason=f"{LICENCES} is not on this machine")


def study(plain, tmp_path, *args: str) -> subprocess.CompletedProcess:  # noqa: F811
    inputs = [f"+model_paths.a={plain['gpt2']}", f"+model_paths.b={plain['llama']}", "data=text_files",
              f"data.path={plain['corpus']}", "data.truncation=true", f"queries.path={plain['queries']}",
              "queries.names=null", "queries.held_out_order=0", "figures_dir=null", "influence.progress=false",
              f"artifacts={tmp_path / 'artifacts'}", "bootstrap_samples=20"]
    return subprocess.run([sys.executable, "-m", "experiments.sparsity", *args, *inputs], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_joblib_sweep_scores_one_job_per_model_then_gathers(plain, tmp_path):  # noqa: F811
    scored = study(plain, tmp_path, "-m", "models=[a],[b]", "stage=score", "hydra/launcher=joblib",
                   "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert "Joblib" in scored.stdout + scored.stderr  # the joblib launcher ran the jobs
    assert sorted(p.name for p in (tmp_path / "artifacts" / "scores").iterdir()) == ["a", "b"]
    assert not list(tmp_path.glob("sweep/*/study.json"))  # stage=score analyses nothing

    gathered = study(plain, tmp_path, "models=[a,b]", "stage=gather", f"hydra.run.dir={tmp_path / 'gather'}")
    assert gathered.returncode == 0, gathered.stderr[-2000:]
    record = json.loads((tmp_path / "gather" / "study.json").read_text())
    assert [m["name"] for m in record["models"]] == ["a", "b"] and record["settings"]["compute"] is False
    assert all(v["n_models"] == 2 for v in record["verdicts"])

    missing = study(plain, tmp_path, "models=[a,c]", "+model_paths.c=" + str(plain["gpt2"]), "stage=gather",
                    f"hydra.run.dir={tmp_path / 'gather2'}")
    assert missing.returncode != 0 and "compute=false only reads saved results" in missing.stderr


def test_submitit_launcher_is_configured_when_installed():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="experiment/sparsity", overrides=["hydra/launcher=submitit_slurm"],
                      return_hydra_config=True)
    assert "submitit" in cfg.hydra.launcher._target_


def test_pythia_sweep_config_runs_unchanged_once_the_weights_are_in_the_hf_cache(plain, tmp_path):  # noqa: F811
    """sweep=pythia selects configs/model/pythia-*.yaml (EleutherAI/pythia-*) and the paper's App E queries; with a
    model in the Hugging Face cache under that name (here the plain GPT-2, standing in for the weights) a study
    scores it offline with no other change."""
    import shutil

    snapshot = tmp_path / "hf" / "hub" / "models--EleutherAI--pythia-70m" / "snapshots" / ("0" * 40)
    shutil.copytree(plain["gpt2"], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    done = subprocess.run(
        [sys.executable, "-m", "experiments.sparsity", "sweep=pythia", "models=[pythia-70m]", "stage=score",
         f"data.path={plain['corpus']}", "data.truncation=true", "queries.names=[water,shutdown]",
         f"artifacts={tmp_path / 'artifacts'}", "influence.progress=false", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**env, "HF_HOME": str(tmp_path / "hf")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "scored pythia-70m: 2 queries" in done.stdout
    assert [p.name for p in (tmp_path / "artifacts" / "scores").iterdir()] == ["pythia-70m"]
