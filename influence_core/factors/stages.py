"""Factors on disk: a factor directory holds

    manifest.json                   what the factors were fitted from (settings, layer names and shapes, model and
                                    per-layer fingerprints, data fingerprint), the finished stages and their timings
    <stage>.safetensors             one file per finished stage: covariance, eigendecomposition, eigenvalue_correction
    <stage>.partial.rank<r>.*       a pass's running sums while it runs (passes.PassCheckpoint)
    factors.safetensors             the fitted factors, '<layer>.<field>' keys

Every file is written atomically (temporary name, then os.replace). A rerun reuses finished stages and refuses a
directory fitted with other settings or on another model (FactorMismatchError); a damaged file is named.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

from safetensors.torch import load_file, save_file

from .. import distributed
from ..tracking import TrackedLayer, model_fingerprint
from .passes import PassCheckpoint, checkpoint_path
from .strategies import STRATEGIES
from .types import FactorArguments, FactorMismatchError, Factors, Tensors



def fitted_identity(layers: Sequence[TrackedLayer], args: FactorArguments, data_fingerprint: str | None) -> dict:
    """The manifest entries a directory must match to be reused: settings, layer names, model and data fingerprint."""
    return {**args.fitted_settings(), "layer_names": [l.name for l in layers],
            "model_fingerprint": model_fingerprint(layers), "data_fingerprint": data_fingerprint}


# what a manifest written before a setting existed means by leaving it out
SETTINGS_BEFORE_THEIR_KEY = {"correction_labels": "own pass", "correction_fraction": None}


def check_manifest(saved: dict, expected: dict, directory: Path) -> None:
    """Refuse a directory whose manifest differs from `expected` (a missing data fingerprint on either side is fine;
    a setting the manifest predates counts as its value then, SETTINGS_BEFORE_THEIR_KEY)."""
    for key, value in expected.items():
        if key == "data_fingerprint" and (value is None or saved.get(key) is None):
            continue
        found = saved.get(key, SETTINGS_BEFORE_THEIR_KEY.get(key))
        if found != value:
            raise FactorMismatchError(
                f"factor files in {directory} were fitted with {key}={found!r}, but this run has "
                f"{key}={value!r}; use another output directory or delete the old one"
            )


def save_factors(factors: Factors, directory: str | Path) -> None:
    """factors.safetensors ('<layer>.<field>' per tensor) and manifest.json (with 'factors' among the stages done)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{key}": value.contiguous() for name, lf in factors.layers.items()
               for key, value in lf.tensors().items()}
    atomic_save(tensors, directory / "factors.safetensors")
    write_json({**factors.manifest, "stages_done": sorted(set(factors.manifest.get("stages_done", [])) | {"factors"})},
               directory / "manifest.json")


def load_factors(directory: str | Path, layers: Sequence[TrackedLayer] | None = None,
                 args: FactorArguments | None = None) -> Factors:
    """Saved factors; with `layers` (and `args`), refuse files fitted on another model or config (FactorMismatchError).
    Damping: that of `args`, else the one they were fitted with."""
    directory = Path(directory)
    manifest_path, tensor_path = directory / "manifest.json", directory / "factors.safetensors"
    if not tensor_path.exists() or not manifest_path.exists():
        raise FileNotFoundError(f"no fitted factors in {directory} (expected manifest.json and factors.safetensors)")
    manifest = read_json(manifest_path)
    if layers is not None:
        expected_args = args or FactorArguments(**manifest["arguments"])
        check_manifest(manifest, fitted_identity(layers, expected_args, manifest.get("data_fingerprint")), directory)
    tensors = read_tensors(tensor_path)
    strategy = STRATEGIES[manifest["strategy"]]
    by_layer = {name: strategy.load(name, tensors) for name in manifest["layer_names"]}
    damping_factor = args.damping_factor if args else manifest["arguments"]["damping_factor"]
    damping = args.damping if args else manifest["arguments"]["damping"]
    factors = Factors(manifest["strategy"], by_layer, manifest, damping_factor, damping)
    if layers is not None:
        factors.check_layers(layers)
    return factors


class StageDirectory:
    """The stages of one fit, in `directory` (or, with None, only computed and timed).

    `open()` checks an existing manifest (and returns the factors when the fit had finished), `stage(name, compute)`
    reads a finished stage or computes and saves it, `checkpoint(name)` gives the pass checkpoint, `finish(factors)`
    saves the result. Under torch.distributed only rank 0 writes; every rank computes the same numbers.
    """

    def __init__(self, directory: str | Path | None, manifest: dict, identity: dict, args: FactorArguments,
                 layers: Sequence[TrackedLayer]):
        self.directory = Path(directory) if directory is not None else None
        self.manifest, self.identity, self.args, self.layers = manifest, identity, args, list(layers)
        self.main = distributed.is_main()

    def open(self) -> Factors | None:
        directory = self.directory
        if directory is None:
            return None
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / "manifest.json").exists():
            saved = read_json(directory / "manifest.json")
            check_manifest(saved, self.identity, directory)
            self.manifest.update(timings_s=saved.get("timings_s", {}), stages_done=saved.get("stages_done", []))
            if "factors" in self.manifest["stages_done"]:
                return load_factors(directory, self.layers, self.args)
        distributed.barrier()  # every rank has read the old manifest before rank 0 rewrites it
        if self.main:  # written now, so a pass checkpoint in this folder is never resumed under another identity
            write_json(self.manifest, directory / "manifest.json")
        distributed.barrier()
        return None

    def stage(self, name: str, compute: Callable[[], Tensors]) -> Tensors:
        directory = self.directory
        path = directory / f"{name}.safetensors" if directory is not None else None
        if path is not None and name in self.manifest["stages_done"] and path.exists():
            return read_tensors(path)
        start = time.perf_counter()
        tensors = compute()
        self.manifest["timings_s"][name] = round(time.perf_counter() - start, 3)
        if path is not None:
            if self.main:
                atomic_save(tensors, path)
                self.manifest["stages_done"] = sorted(set(self.manifest["stages_done"]) | {name})
                write_json(self.manifest, directory / "manifest.json")
            for partial in directory.glob(f"{name}.partial.rank*.safetensors"):
                if partial.name == checkpoint_path(directory, name).name:
                    partial.unlink(missing_ok=True)  # the finished stage supersedes this rank's pass checkpoint
            distributed.barrier()
        return tensors

    def checkpoint(self, name: str) -> PassCheckpoint | None:
        if self.directory is None or self.args.checkpoint_every <= 0:
            return None
        return PassCheckpoint(checkpoint_path(self.directory, name), self.args.checkpoint_every)

    def finish(self, factors: Factors) -> None:
        if self.directory is not None:
            if self.main:
                save_factors(factors, self.directory)
            distributed.barrier()


def read_json(path: Path) -> dict:
    """A JSON file, or an error naming a damaged (e.g. truncated) one and how to recover."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is damaged (not valid JSON: {error}); delete it and rerun to recompute") from error


def read_tensors(path: Path) -> Tensors:
    """A safetensors file, or an error naming a damaged (e.g. truncated) one and how to recover."""
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError) on a damaged file
        raise ValueError(f"{path} is damaged (cannot be read as safetensors: {error}); delete it and rerun to "
                         "recompute") from error


def atomic_save(tensors: Tensors, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def write_json(data: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
