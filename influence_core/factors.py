"""Curvature factors (K-FAC / EK-FAC) of the Gauss-Newton Hessian, and the inverse-Hessian-vector product.

Per tracked layer, with a_t the layer input (homogeneous 1 appended) and g_t the pseudo-gradient w.r.t. the
layer output at token t (labels sampled from the model, so G is the true Fisher = Gauss-Newton for softmax
cross-entropy), and N fitting sequences of T_n real tokens:

    A = (1 / sum_n T_n) sum_{n,t} a_t a_t^T             activation covariance,  (d_in, d_in)
    S = (1 / N)         sum_{n,t} g_t g_t^T             pseudo-gradient covariance, (d_out, d_out)
    A = Q_A diag(l_A) Q_A^T,  S = Q_S diag(l_S) Q_S^T   eigendecompositions
    G_l ~ A (x) S                                        K-FAC (per-sequence scale: tokens summed)
    Lambda = (1/N) sum_n (Q_S^T D_n Q_A)^2               EK-FAC eigenvalue correction (paper Eq 20),
             with D_n = sum_t g_t a_t^T the per-sequence pseudo-gradient, (d_out, d_in)

IHVP (paper Eq 21):  (G_l + lambda I)^{-1} V = Q_S [ (Q_S^T V Q_A) / (Lambda + lambda) ] Q_A^T,
with lambda = damping_factor x mean(Lambda) per layer (0.1 by default) unless an absolute damping is given.

Strategies: "ekfac" (above), "kfac" (Lambda = l_S l_A^T), "diagonal" (Lambda = (1/N) sum_n D_n^2 in the
parameter basis), "identity" (no preconditioning: the plain gradient dot product baseline).

Sampled labels of fitting batch i come from a generator seeded by (seed, pass, i), so the numbers do not depend
on how batches are split over processes. Under torch.distributed (`distributed.py`) batch i is processed by rank
i mod N and the sums and counts are all-reduced. With `checkpoint_every`, a pass saves its running sums every
K batches and a rerun continues from there.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .batch import accumulation_dtype, check_finite, check_nonempty, refuse_one_shot, row_count, to_device, upcast
from .task import IGNORE_INDEX, Batch, Task, sampled_label_surrogate, trim_padding
from .tracking import (LayerCapture, TrackedLayer, layer_fingerprints, model_fingerprint,
                       tracked_parameters_require_grad)

Strategy = Literal["ekfac", "kfac", "diagonal", "identity"]
STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")
FORMAT_VERSION = 1
LABEL_SAMPLING = "inverse-cdf/per-batch-generator"  # changes to how pseudo-labels are drawn invalidate saved factors


ACCUMULATION_DTYPES = ("float32", "float64")


class FactorMismatchError(ValueError):
    """A factor directory was fitted on another model, layer set or configuration."""


def check_number(name: str, value, minimum: float, integer: bool = False, strict: bool = False) -> None:
    """Refuse a field that is not a number (int for `integer`), or below `minimum` (at or below with `strict`)."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value != value or (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value!r}")


@dataclass
class FactorArguments:
    """How curvature factors are fitted. Defaults follow the paper."""

    strategy: Strategy = "ekfac"
    damping_factor: float = 0.1  # lambda_l = damping_factor x mean(Lambda_l)  (paper: 0.1)
    damping: float | None = None  # absolute damping for every layer; overrides damping_factor
    fisher: Literal["sampled", "expected"] = "sampled"  # "expected": exact E_y over classes, one predicted position per example
    seed: int = 0  # for the sampled labels
    dtype: str = "float32"  # accumulation dtype of the covariances and the correction
    progress: bool = True
    checkpoint_every: int = 0  # with an output_dir, save a pass's running sums every K batches (0: only per stage)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy '{self.strategy}'; choose one of {STRATEGIES}")
        if self.fisher not in ("sampled", "expected"):
            raise ValueError(f"unknown fisher '{self.fisher}'; choose 'sampled' or 'expected'")
        check_number("damping_factor", self.damping_factor, 0)
        if self.damping is not None:
            check_number("damping", self.damping, 0)
        check_number("seed", self.seed, float("-inf"), integer=True)
        check_number("checkpoint_every", self.checkpoint_every, 0, integer=True)
        if self.dtype not in ACCUMULATION_DTYPES:
            raise ValueError(
                f"FactorArguments.dtype={self.dtype!r} is the accumulation dtype of the factors and must be one of "
                f"{ACCUMULATION_DTYPES}; the model's precision is set on the model (e.g. model.to(torch.bfloat16))")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def identity(self) -> dict:
        """The settings that change the fitted numbers (damping is applied later, so it is not among them)."""
        return {"strategy": self.strategy, "fisher": self.fisher, "seed": self.seed, "dtype": self.dtype,
                "label_sampling": LABEL_SAMPLING}


@dataclass
class LayerFactors:
    """The fitted curvature of one layer. Rotations are None in the parameter basis (diagonal strategy)."""

    name: str
    activation_eigenvectors: torch.Tensor | None  # Q_A (d_in, d_in)
    gradient_eigenvectors: torch.Tensor | None  # Q_S (d_out, d_out)
    eigenvalues: torch.Tensor | None  # Lambda (d_out, d_in); None for the identity strategy

    def damping_value(self, damping_factor: float, damping: float | None) -> float:
        if self.eigenvalues is None:
            return 0.0
        return float(damping) if damping is not None else damping_factor * float(self.eigenvalues.mean())

    def precondition(self, v: torch.Tensor, damping: float, power: float = 1.0) -> torch.Tensor:
        """(G_l + damping I)^{-power} v for v of shape (..., d_out, d_in); identity strategy returns v.

        Q_S [(Q_S^T V Q_A) / (Lambda + damping)^power] Q_A^T (Eq 21); power 1: the IHVP, 1/2: a symmetric square root.
        Computed in the factors' dtype; returned in v's dtype, but never below float32 (a bf16 query gradient gives a
        float32 preconditioned query: rounding it back to 8 bits would undo the fp32 factors).
        """
        dtype = accumulation_dtype(v.dtype)
        if self.eigenvalues is None:
            return v.to(dtype)
        v = v.to(self.eigenvalues.dtype)
        # on v's device (a no-op where they already are): factors are loaded on the CPU, queries live on the model's
        q_a, q_s, eigenvalues = (t.to(v.device) if t is not None else None
                                 for t in (self.activation_eigenvectors, self.gradient_eigenvectors, self.eigenvalues))
        rotated = q_s.T @ v @ q_a if q_a is not None else v
        scale = eigenvalues + damping
        rotated = rotated / (scale if power == 1.0 else scale ** power)
        out = q_s @ rotated @ q_a.T if q_a is not None else rotated
        return out.to(dtype)


@dataclass
class Factors:
    """Fitted factors for a list of tracked layers, plus the manifest that says how they were made."""

    strategy: Strategy
    layers: dict[str, LayerFactors]
    manifest: dict = field(default_factory=dict)
    damping_factor: float = 0.1
    damping: float | None = None

    def damping_for(self, name: str) -> float:
        return self.layers[name].damping_value(self.damping_factor, self.damping)

    def with_damping(self, damping_factor: float = 0.1, damping: float | None = None) -> "Factors":
        """The same factors under another damping (e.g. for an ablation); nothing is refitted."""
        return Factors(self.strategy, self.layers, self.manifest, damping_factor, damping)

    def precondition(self, name: str, v: torch.Tensor) -> torch.Tensor:
        return self.layers[name].precondition(v, self.damping_for(name))

    def layer_shape(self, name: str) -> tuple[int, int] | None:
        """(d_out, d_in [+1]) the factors of a layer were fitted for: from its tensors, else the manifest; None if unknown."""
        lf = self.layers[name]
        if lf.eigenvalues is not None:
            return tuple(lf.eigenvalues.shape[-2:])
        if lf.gradient_eigenvectors is not None and lf.activation_eigenvectors is not None:
            return lf.gradient_eigenvectors.shape[0], lf.activation_eigenvectors.shape[0]
        shape = self.manifest.get("layer_shapes", {}).get(name)
        return tuple(shape) if shape is not None else None

    def check_covers(self, layer_names: Iterable[str]) -> None:
        missing = [n for n in layer_names if n not in self.layers]
        if missing:
            raise FactorMismatchError(f"no factors for layers {sorted(missing)}; fit factors on the same tracked layers")

    def check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Refuse factors whose layer shapes differ from `shapes` ({name: (d_out, d_in [+1])})."""
        self.check_covers(shapes)
        for name, shape in shapes.items():
            fitted = self.layer_shape(name)
            if fitted is not None and tuple(fitted) != tuple(shape):
                raise FactorMismatchError(
                    f"the factors of layer '{name}' were fitted for (d_out, d_in+1) = {tuple(fitted)}, but here it is "
                    f"{tuple(shape)}: the factors come from another model; refit them on this model or pass the "
                    "factor directory fitted on it")

    def check_fingerprints(self, fingerprints: dict[str, str], names_in_order: Sequence[str] | None = None,
                           model_print: str | None = None) -> None:
        """Refuse factors fitted on other weights: per-layer fingerprints (any subset of the fitted layers), or, for
        factor files made before those were recorded, the whole-model fingerprint when the layers are the same."""
        saved = self.manifest.get("layer_fingerprints")
        if saved:
            for name, value in fingerprints.items():
                if name in saved and saved[name] != value:
                    raise FactorMismatchError(
                        f"the factors of layer '{name}' were fitted on a model with fingerprint {saved[name]}, this "
                        f"model's is {value}: refit the factors on this model or pass the factor directory fitted on it")
        elif "model_fingerprint" in self.manifest and model_print is not None and \
                list(names_in_order or []) == list(self.manifest.get("layer_names", [])):
            if self.manifest["model_fingerprint"] != model_print:
                raise FactorMismatchError(
                    f"the factors were fitted on a model with fingerprint {self.manifest['model_fingerprint']}, this "
                    f"model's is {model_print}: refit the factors on this model or pass the factor directory fitted on it")

    def check_layers(self, layers: Sequence[TrackedLayer]) -> None:
        """Refuse factors that do not belong to these tracked layers (names, shapes, model fingerprint)."""
        layers = list(layers)
        self.check_shapes({l.name: (l.out_features, l.input_dim) for l in layers})
        self.check_fingerprints(layer_fingerprints(layers), [l.name for l in layers], model_fingerprint(layers))

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, lf in self.layers.items():
            for key in ("activation_eigenvectors", "gradient_eigenvectors", "eigenvalues"):
                value = getattr(lf, key)
                if value is not None:
                    tensors[f"{name}.{key}"] = value.contiguous()
        _atomic_save(tensors, directory / "factors.safetensors")
        _write_json({**self.manifest, "stages_done": sorted(set(self.manifest.get("stages_done", [])) | {"factors"})},
                    directory / "manifest.json")

    @classmethod
    def load(cls, directory: str | Path, layers: Sequence[TrackedLayer] | None = None,
             args: FactorArguments | None = None) -> "Factors":
        """Load saved factors; with `layers` (and `args`), refuse files fitted on another model or config."""
        directory = Path(directory)
        manifest_path, tensor_path = directory / "manifest.json", directory / "factors.safetensors"
        if not tensor_path.exists() or not manifest_path.exists():
            raise FileNotFoundError(f"no fitted factors in {directory} (expected manifest.json and factors.safetensors)")
        manifest = read_json(manifest_path)
        if layers is not None:
            expected_args = args or FactorArguments(**manifest["arguments"])
            _check_manifest(manifest, _identity(layers, expected_args, manifest.get("data_fingerprint")), directory)
        tensors = read_tensors(tensor_path)
        by_layer = {}
        for name in manifest["layer_names"]:
            by_layer[name] = LayerFactors(
                name,
                tensors.get(f"{name}.activation_eigenvectors"),
                tensors.get(f"{name}.gradient_eigenvectors"),
                tensors.get(f"{name}.eigenvalues"),
            )
        damping_factor = args.damping_factor if args else manifest["arguments"]["damping_factor"]
        damping = args.damping if args else manifest["arguments"]["damping"]
        factors = cls(manifest["strategy"], by_layer, manifest, damping_factor, damping)
        if layers is not None:
            factors.check_layers(layers)
        return factors


# ----------------------------------------------------------------------------------------------------------
# Fitting


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
    if args.strategy != "identity":
        refuse_one_shot(batches, "fit_factors")
    identity = _identity(layers, args, data_fingerprint)
    manifest = {**identity, "arguments": asdict(args), "layer_shapes": {l.name: [l.out_features, l.input_dim] for l in layers},
                "layer_fingerprints": layer_fingerprints(layers),
                "format_version": FORMAT_VERSION, "torch_version": torch.__version__, "timings_s": {}, "stages_done": []}
    directory = Path(output_dir) if output_dir is not None else None
    main = distributed.is_main()  # under torch.distributed only rank 0 writes; every rank computes the same factors
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    if directory is not None and (directory / "manifest.json").exists():
        saved = read_json(directory / "manifest.json")
        _check_manifest(saved, identity, directory)
        manifest.update(timings_s=saved.get("timings_s", {}), stages_done=saved.get("stages_done", []))
        if "factors" in manifest["stages_done"]:
            return Factors.load(directory, layers, args)
    if directory is not None:
        distributed.barrier()  # every rank has read the old manifest before rank 0 rewrites it
        if main:  # written now, so a pass checkpoint in this folder is never resumed under another identity
            _write_json(manifest, directory / "manifest.json")
        distributed.barrier()

    def stage(name: str, compute) -> dict[str, torch.Tensor]:
        path = directory / f"{name}.safetensors" if directory is not None else None
        if path is not None and name in manifest["stages_done"] and path.exists():
            return read_tensors(path)
        start = time.perf_counter()
        tensors = compute()
        manifest["timings_s"][name] = round(time.perf_counter() - start, 3)
        if path is not None:
            if main:
                _atomic_save(tensors, path)
                manifest["stages_done"] = sorted(set(manifest["stages_done"]) | {name})
                _write_json(manifest, directory / "manifest.json")
            for partial in directory.glob(f"{name}.partial.rank*.safetensors"):
                if partial.name == _checkpoint_path(directory, name).name:
                    partial.unlink(missing_ok=True)  # the finished stage supersedes this rank's pass checkpoint
            distributed.barrier()
        return tensors

    def checkpoint(name: str) -> "PassCheckpoint | None":
        if directory is None or args.checkpoint_every <= 0:
            return None
        return PassCheckpoint(_checkpoint_path(directory, name), args.checkpoint_every)

    model_was_training = model.training
    model.eval()
    try:
        names = [l.name for l in layers]
        if args.strategy == "identity":
            factors = {n: LayerFactors(n, None, None, None) for n in names}
        elif args.strategy == "diagonal":
            diag = stage("eigenvalue_correction", lambda: _correction_pass(model, layers, task, batches, args, None,
                                                                           checkpoint("eigenvalue_correction")))
            factors = {n: LayerFactors(n, None, None, diag[f"{n}.eigenvalues"]) for n in names}
        else:
            cov = stage("covariance", lambda: _covariance_pass(model, layers, task, batches, args, checkpoint("covariance")))
            eig = stage("eigendecomposition", lambda: _eigendecomposition(cov, names, args))
            if args.strategy == "kfac":
                factors = {
                    n: LayerFactors(n, eig[f"{n}.activation_eigenvectors"], eig[f"{n}.gradient_eigenvectors"],
                                    torch.outer(eig[f"{n}.gradient_eigenvalues"], eig[f"{n}.activation_eigenvalues"]))
                    for n in names
                }
            else:
                corr = stage("eigenvalue_correction", lambda: _correction_pass(model, layers, task, batches, args, eig,
                                                                               checkpoint("eigenvalue_correction")))
                factors = {n: LayerFactors(n, eig[f"{n}.activation_eigenvectors"], eig[f"{n}.gradient_eigenvectors"],
                                           corr[f"{n}.eigenvalues"]) for n in names}
    finally:
        model.train(model_was_training)

    result = Factors(args.strategy, factors, manifest, args.damping_factor, args.damping)
    for name, lf in factors.items():
        if lf.eigenvalues is not None:
            check_finite(lf.eigenvalues, f"eigenvalues of layer '{name}'")
    if directory is not None:
        if main:
            result.save(directory)
        distributed.barrier()
    return result


def _pseudo_gradients(model: nn.Module, task: Task, capture: LayerCapture, batch: Batch, args: FactorArguments,
                      generator: torch.Generator, dropped_columns: int = 0) -> list[dict[str, torch.Tensor]]:
    """Output pseudo-gradients g (B, T, d_out) per layer; one dict per pseudo-label draw. dropped_columns: padding
    columns trim_padding removed from the batch (the default sampler then draws the labels of the untrimmed batch).

    "sampled": one draw y ~ p per position (paper). "expected": C weighted draws whose outer products sum to
    the exact expectation, using H = diag(p) - p p^T = R R^T with R[:, c] = sqrt(p_c) (e_c - p).
    """
    capture.clear(batch)
    if args.fisher == "sampled":
        if type(task).pseudo_loss is Task.pseudo_loss:  # the default definition: its cheaper twin, same gradient
            loss = sampled_label_surrogate(*task.forward(model, batch), generator, dropped_columns)
        else:
            loss = task.pseudo_loss(model, batch, generator)
        check_finite(loss, "pseudo loss")
        return [capture.output_gradients(loss)]
    logits, labels = task.forward(model, batch)
    valid = labels != IGNORE_INDEX
    if bool((valid.sum(dim=1) > 1).any()):
        raise ValueError("fisher='expected' is exact only with one predicted position per example; use 'sampled'")
    p = torch.softmax(logits.detach().double(), dim=-1) * valid.unsqueeze(-1)
    sqrt_p = p.sqrt()
    draws = []
    num_classes = logits.shape[-1]
    for c in range(num_classes):
        r = -p * sqrt_p[..., c : c + 1]
        r[..., c] += sqrt_p[..., c]
        draws.append(capture.output_gradients((logits * r.to(logits.dtype)).sum(), retain_graph=c < num_classes - 1))
    return draws


def token_weights(task: Task, batch: Batch, activation: torch.Tensor) -> torch.Tensor:
    """(B, T, 1) float mask of real input tokens, aligned with the captured activations."""
    mask = task.token_mask(batch)
    if mask is None:
        return activation.new_ones(*activation.shape[:2], 1)
    return mask.to(activation.device, activation.dtype).reshape(*activation.shape[:2], 1)


def real_token_activations(task: Task, batch: Batch, activation: torch.Tensor) -> torch.Tensor:
    """a (B, T, d_in) with padding tokens zeroed; a itself, not a masked copy, when every token is real."""
    mask = task.token_mask(batch)
    if mask is None or bool(mask.all()):
        return activation
    return activation * token_weights(task, batch, activation)


def per_sequence_gradients(activations: torch.Tensor, output_gradients: torch.Tensor) -> torch.Tensor:
    """D_n = sum_t g_t a_t^T: a (B, T, d_in), g (B, T, d_out) -> (B, d_out, d_in).

    One batched matmul on the strided g^T (torch.einsum copied its operands into another layout first).
    """
    return torch.bmm(output_gradients.transpose(1, 2), activations)


def rotate_tokens_first(tokens: int, d_out: int, d_in: int) -> bool:
    """Whether Q_S^T D_n Q_A is cheaper as (g_t Q_S)(a_t Q_A) summed over tokens, T (d_in^2 + d_out^2) multiply-adds
    per sequence, than by rotating D_n itself, d_out d_in (d_out + d_in): short sequences rotate tokens."""
    return tokens * (d_in * d_in + d_out * d_out) < d_out * d_in * (d_out + d_in)


def _covariance_pass(model, layers, task, batches, args: FactorArguments,
                     checkpoint: "PassCheckpoint | None" = None) -> dict[str, torch.Tensor]:
    dtype = args.torch_dtype
    sums = {f"{l.name}.activation": torch.zeros(l.input_dim, l.input_dim, dtype=dtype) for l in layers}
    sums.update({f"{l.name}.gradient": torch.zeros(l.out_features, l.out_features, dtype=dtype) for l in layers})
    sums["num_tokens"] = torch.zeros((), dtype=torch.float64)
    sums["num_sequences"] = torch.zeros((), dtype=torch.float64)
    sums["num_predicted"] = torch.zeros((), dtype=torch.float64)
    with tracked_parameters_require_grad(layers), LayerCapture(layers) as capture:
        for index, batch, counted in _owned_batches(model, batches, checkpoint, sums, "factors: covariance", args.progress):
            batch, dropped = trim_padding(to_device(batch, model))
            draws = _pseudo_gradients(model, task, capture, batch, args, batch_generator(args.seed, 0, index),
                                      dropped)
            if not counted:
                continue  # a sharded model's filler pass: it only joins the other ranks' weight all-gathers
            for layer in layers:
                a = real_token_activations(task, batch, upcast(capture.activations[layer.name], dtype))
                _add_gram(sums[f"{layer.name}.activation"], a.reshape(-1, a.shape[-1]))
                for grads in draws:
                    g = upcast(grads[layer.name], dtype).reshape(-1, layer.out_features)
                    check_finite(g, f"pseudo-gradient of layer '{layer.name}'")
                    _add_gram(sums[f"{layer.name}.gradient"], g)
            sums["num_tokens"] += float(token_weights(task, batch, a).sum())
            sums["num_sequences"] += row_count(batch)
            sums["num_predicted"] += _predicted(task, batch)
            if checkpoint is not None:
                checkpoint.step(index, sums)
    distributed.all_reduce_sum(sums)
    num_tokens, num_sequences = float(sums["num_tokens"]), float(sums["num_sequences"])
    if num_sequences == 0:
        raise ValueError("the fitting data is empty: no batches to fit factors on")
    _check_predicted(task, float(sums["num_predicted"]))
    out = {}
    for layer in layers:
        name = layer.name
        out[f"{name}.activation_covariance"] = sums[f"{name}.activation"] / num_tokens
        out[f"{name}.gradient_covariance"] = sums[f"{name}.gradient"] / num_sequences
        check_finite(out[f"{name}.activation_covariance"], f"activation covariance of '{name}'")
    out["num_tokens"] = torch.tensor(num_tokens)
    out["num_sequences"] = torch.tensor(num_sequences)
    return out


def _eigendecomposition(cov: dict[str, torch.Tensor], names: Sequence[str], args: FactorArguments) -> dict[str, torch.Tensor]:
    """Symmetric eigendecomposition in float64 (small matrices; precision matters for tiny eigenvalues)."""
    out = {}
    for name in names:
        for kind in ("activation", "gradient"):
            matrix = cov[f"{name}.{kind}_covariance"].double()
            values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
            out[f"{name}.{kind}_eigenvalues"] = values.to(args.torch_dtype)
            out[f"{name}.{kind}_eigenvectors"] = vectors.to(args.torch_dtype)
    return out


def _correction_pass(model, layers, task, batches, args: FactorArguments, eig: dict[str, torch.Tensor] | None,
                     checkpoint: "PassCheckpoint | None" = None) -> dict[str, torch.Tensor]:
    """Lambda = (1/N) sum_n (Q_S^T D_n Q_A)^2 with D_n = sum_t g_t a_t^T; no rotation when eig is None."""
    dtype = args.torch_dtype
    sums = {l.name: torch.zeros(l.out_features, l.input_dim, dtype=dtype) for l in layers}
    sums["num_sequences"] = torch.zeros((), dtype=torch.float64)
    sums["num_predicted"] = torch.zeros((), dtype=torch.float64)
    with tracked_parameters_require_grad(layers), LayerCapture(layers) as capture:
        for index, batch, counted in _owned_batches(model, batches, checkpoint, sums, "factors: eigenvalue correction", args.progress):
            batch, dropped = trim_padding(to_device(batch, model))
            draws = _pseudo_gradients(model, task, capture, batch, args, batch_generator(args.seed, 1, index),
                                      dropped)
            if not counted:
                continue  # a sharded model's filler pass: it only joins the other ranks' weight all-gathers
            for layer in layers:
                a = real_token_activations(task, batch, upcast(capture.activations[layer.name], dtype))
                q_a = q_s = None
                if eig is not None:
                    q_a = eig[f"{layer.name}.activation_eigenvectors"].to(a.device)
                    q_s = eig[f"{layer.name}.gradient_eigenvectors"].to(a.device)
                tokens_first = q_a is not None and rotate_tokens_first(a.shape[1], layer.out_features, layer.input_dim)
                if tokens_first:
                    a = a @ q_a
                for grads in draws:
                    g = upcast(grads[layer.name], dtype)
                    if tokens_first:
                        per_sequence = per_sequence_gradients(a, g @ q_s)  # rotated D_n, (B, d_out, d_in)
                    else:
                        per_sequence = per_sequence_gradients(a, g)
                        if q_a is not None:
                            per_sequence = q_s.T @ per_sequence @ q_a
                    sums[layer.name] += per_sequence.square_().sum(dim=0).cpu()
            sums["num_sequences"] += row_count(batch)
            sums["num_predicted"] += _predicted(task, batch)
            if checkpoint is not None:
                checkpoint.step(index, sums)
    distributed.all_reduce_sum(sums)
    num_sequences = float(sums.pop("num_sequences"))
    if num_sequences == 0:
        raise ValueError("the fitting data is empty: no batches to fit factors on")
    _check_predicted(task, float(sums.pop("num_predicted")))
    return {f"{name}.eigenvalues": s / num_sequences for name, s in sums.items()}


def _add_gram(target: torch.Tensor, x: torch.Tensor) -> None:
    """target += x^T x for x (tokens, d); in place on the CPU (a fresh (d, d) temporary per batch is slow)."""
    if x.device == target.device:
        target.addmm_(x.T, x)
    else:
        target.add_((x.T @ x).cpu())


def batch_generator(seed: int, pass_index: int, batch_index: int) -> torch.Generator:
    """The generator of the sampled labels of one fitting batch: a function of (seed, pass, batch index) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + batch_index) * 4 + pass_index)


class PassCheckpoint:
    """Running sums of a fitting pass saved every K batches (atomically), and restored on a rerun.

    One file per rank: `<stage>.partial.rank<r>.safetensors`, holding this rank's sums (before the all-reduce)
    and, in its metadata, the index of the next batch and the world size it was made with.
    """

    def __init__(self, path: Path, every: int):
        self.path, self.every = path, every
        self.next_batch = 0
        self._since_save = 0

    def restore(self, sums: dict[str, torch.Tensor]) -> None:
        """Load saved sums into `sums` in place and set `next_batch`; nothing to do without a file."""
        if not self.path.exists():
            return
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                saved = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as error:  # a damaged file (SafetensorError)
            raise ValueError(f"pass checkpoint {self.path} is damaged ({error}); delete it and rerun to recompute "
                             "the pass") from error
        if int(meta.get("world_size", -1)) != distributed.world_size():
            raise FactorMismatchError(
                f"pass checkpoint {self.path} was written by a run with world_size={meta.get('world_size')}, "
                f"this run has {distributed.world_size()}; rerun with the same number of processes or delete it"
            )
        if set(saved) != set(sums) or any(saved[k].shape != sums[k].shape for k in sums):
            raise FactorMismatchError(f"pass checkpoint {self.path} holds other tensors than this pass; delete it")
        for key, value in saved.items():
            sums[key].copy_(value)
        self.next_batch = int(meta["next_batch"])

    def step(self, index: int, sums: dict[str, torch.Tensor]) -> None:
        """Called after batch `index` was added to the sums; saves every `every` batches of this rank."""
        self._since_save += 1
        if self._since_save >= self.every:
            self.save(index + 1, sums)

    def save(self, next_batch: int, sums: dict[str, torch.Tensor]) -> None:
        tmp = self.path.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in sums.items()}, str(tmp),
                  metadata={"next_batch": str(next_batch), "world_size": str(distributed.world_size()),
                            "rank": str(distributed.rank())})
        os.replace(tmp, self.path)
        self._since_save = 0


def _checkpoint_path(directory: Path, stage: str) -> Path:
    return directory / f"{stage}.partial.rank{distributed.rank()}.safetensors"


def _owned_batches(model: nn.Module, batches, checkpoint: PassCheckpoint | None, sums: dict[str, torch.Tensor],
                   desc: str, progress: bool):
    """(global index, batch, counted) for this rank's batches (index mod world_size == rank), after a restored
    checkpoint, all counted. For a model sharded over the ranks (FSDP) every forward pass is a collective, so a rank
    with fewer batches then repeats one, counted False (run, not added), until it has run as many as the others.
    """
    start = 0
    if checkpoint is not None:
        checkpoint.restore(sums)
        start = checkpoint.next_batch
    total = len(batches) if hasattr(batches, "__len__") else None
    mine = sum(1 for index in range(start, total if total is not None else sum(1 for _ in batches))
               if distributed.owns(index))
    extra = distributed.padding_rounds(model, mine)  # before the first forward: it is a collective too
    bar = tqdm(batches, desc=desc, total=total, disable=not progress or not distributed.is_main(), leave=False,
               initial=0)
    filler = None
    for index, batch in enumerate(bar):
        if index < start or not distributed.owns(index):
            continue
        check_nonempty(batch, index, "fitting")
        filler = (index, batch)
        yield index, batch, True
    if extra:
        filler = filler or (0, next(iter(batches)))
        for _ in range(extra):
            yield filler[0], filler[1], False


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _predicted(task: Task, batch: Batch) -> float:
    """Predicted (non-ignored) labels of a batch, 0 when the task cannot tell without a forward pass."""
    counts = task.label_counts(batch)
    return 0.0 if counts is None else float(counts.sum())


def _check_predicted(task: Task, num_predicted: float) -> None:
    """Refuse fitting data with nothing to predict (all sequences of one token): the curvature would be 0."""
    if num_predicted == 0 and type(task).label_counts is not Task.label_counts:
        raise ValueError("the fitting data has no predicted tokens: every sequence has fewer than 2 tokens (or all "
                         "labels are -100), so the curvature and damping would be 0; fit on sequences of >= 2 tokens")


def _identity(layers: Sequence[TrackedLayer], args: FactorArguments, data_fingerprint: str | None) -> dict:
    return {**args.identity(), "layer_names": [l.name for l in layers], "model_fingerprint": model_fingerprint(layers),
            "data_fingerprint": data_fingerprint}


def _check_manifest(saved: dict, expected: dict, directory: Path) -> None:
    for key, value in expected.items():
        if key == "data_fingerprint" and (value is None or saved.get(key) is None):
            continue
        if saved.get(key) != value:
            raise FactorMismatchError(
                f"factor files in {directory} were fitted with {key}={saved.get(key)!r}, but this run has "
                f"{key}={value!r}; use another output directory or delete the old one"
            )


def read_json(path: Path) -> dict:
    """A JSON file, or an error naming a damaged (e.g. truncated) one and how to recover."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is damaged (not valid JSON: {error}); delete it and rerun to recompute") from error


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or an error naming a damaged (e.g. truncated) one and how to recover."""
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError) on a damaged file
        raise ValueError(f"{path} is damaged (cannot be read as safetensors: {error}); delete it and rerun to "
                         "recompute") from error


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _write_json(data: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
