"""Fine-tuning LDS benchmark and add-k-copies calibration (`make lds`): EK-FAC, K-FAC, diagonal, identity, LiSSA,
TrackStar-style, TRAK-style and BM25 against real retraining on random half-subsets.

    python -m experiments.lds                                     # make lds -> figures/validate/lds/
    python -m experiments.lds subsets.count=50 processes=1

The parts live in experiments/validation/ (retraining.py lists them); this module is the Hydra entry.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.validation.retraining import REPO, run_lds


@hydra.main(version_base="1.3", config_path=str(REPO / "configs"), config_name="experiment/lds")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(max(1, int(cfg.threads)))
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    overrides = " ".join(HydraConfig.get().overrides.task)
    run_lds(cfg, Path(HydraConfig.get().runtime.output_dir), f"python -m experiments.lds {overrides}".strip())


if __name__ == "__main__":
    main()
