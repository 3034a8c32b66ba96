"""Validation study (paper Sec 5.1, App C, Figs 6-7): how close are the influence estimators to the ground truth?

    python -m experiments.validate                                # make validate
    python -m experiments.validate models=[digits_mlp] digits.num_scored=100 damping_ablation=[0.01,0.1]

Per model: f = log p(label | test point) (MLP) or log p(completion | prompt) (LM); influence of a random subset
of training points on each test point / query, by EK-FAC, K-FAC, diagonal, identity and LiSSA, against the exact
damped-GNH influence and the PBRF. The parts live in experiments/validation/ (its __init__ lists them); this module
is the Hydra entry. Outputs: figures/validate/ (tables, figure, README.md, study.json).
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.validation.comparison import REPO, run, run_models  # noqa: F401  (the entry's API)

__all__ = ["main", "run", "run_models"]


@hydra.main(version_base="1.3", config_path=str(REPO / "configs"), config_name="experiment/validate")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(max(1, int(cfg.threads)))
    overrides = " ".join(HydraConfig.get().overrides.task)
    run(cfg, Path(HydraConfig.get().runtime.output_dir), f"python -m experiments.validate {overrides}".strip())


if __name__ == "__main__":
    main()
