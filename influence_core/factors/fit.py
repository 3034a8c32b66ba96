"""fit_factors: run a strategy's stages over the fitting data, resumable in an output directory."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from ..batch import Batch, check_finite, eval_mode, refuse_one_shot
from ..task import Task
from ..tracking import TrackedLayer, layer_fingerprints
from .passes import PassCheckpoint
from .stages import StageDirectory, fitted_identity
from .strategies import STRATEGIES
from .types import FactorArguments, Factors, Tensors, check_output_blocks

FORMAT_VERSION = 1


@dataclass
class FitRun:
    """What a strategy's `fit` works with: the model, its tracked layers, the task and data, and the stages."""

    model: nn.Module
    layers: list[TrackedLayer]
    task: Task
    batches: Iterable[Batch]
    args: FactorArguments
    stages: StageDirectory

    @property
    def names(self) -> list[str]:
        return [l.name for l in self.layers]

    def stage(self, name: str, compute) -> Tensors:
        return self.stages.stage(name, compute)

    def checkpoint(self, name: str) -> PassCheckpoint | None:
        return self.stages.checkpoint(name)


def fit_factors(
    model: nn.Module,
    layers: Sequence[TrackedLayer],
    task: Task,
    batches: Iterable[Batch],
    args: FactorArguments | None = None,
    output_dir: str | Path | None = None,
    data_fingerprint: str | None = None,
) -> Factors:
    """Fit the factors of `args.strategy` over the fitting batches (one or two passes).

    With `output_dir`, each stage (covariance, eigendecomposition, eigenvalue correction) is saved as it
    finishes and reused on a rerun with the same model, layers and arguments; other files are refused.
    `batches` must be re-iterable (a list or a DataLoader): a generator is refused.
    """
    args = args or FactorArguments()
    layers = list(layers)
    strategy = STRATEGIES[args.strategy]
    if strategy.reads_data:
        refuse_one_shot(batches, "fit_factors")
    check_output_blocks(layers, args.output_blocks)
    identity = fitted_identity(layers, args, data_fingerprint)
    manifest = {**identity, "arguments": asdict(args),
                "layer_shapes": {l.name: [l.out_features, l.input_dim] for l in layers},
                "layer_fingerprints": layer_fingerprints(layers),
                "format_version": FORMAT_VERSION, "torch_version": torch.__version__, "timings_s": {}, "stages_done": []}
    stages = StageDirectory(output_dir, manifest, identity, args, layers)
    finished = stages.open()
    if finished is not None:
        return finished
    with eval_mode(model):
        fitted = strategy.fit(FitRun(model, layers, task, batches, args, stages))
    for name, lf in fitted.items():
        for key, value in lf.tensors().items():
            check_finite(value, f"{key} of layer '{name}'")
    result = Factors(args.strategy, fitted, manifest, args.damping_factor, args.damping)
    stages.finish(result)
    return result
