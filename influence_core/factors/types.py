"""The factor types: how factors are fitted (FactorArguments), what one layer keeps (one LayerFactors class per
basis), and the fitted set with its checks and the IHVP (Factors). No data passes and no files here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

import torch

from ..batch import accumulation_dtype
from ..lowrank import LowRankQuery, compress_query
from ..tracking import TrackedLayer, layer_fingerprints, model_fingerprint, per_sequence_gradients

STRATEGY_NAMES = ("ekfac", "kfac", "diagonal", "identity")
ACCUMULATION_DTYPES = ("float32", "float64")
LABEL_SAMPLING = "inverse-cdf/per-batch-generator"  # changes to how pseudo-labels are drawn invalidate saved factors
Tensors = dict[str, torch.Tensor]  # a stage's tensors, '<layer>.<field>' keys


class FactorMismatchError(ValueError):
    """Factors (in memory or in a directory) fitted on another model, layer set or configuration."""


def check_number(name: str, value, minimum: float, integer: bool = False, strict: bool = False) -> None:
    """Refuse a field that is not a number (int for `integer`), or below `minimum` (at or below with `strict`)."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value != value or (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value!r}")


def check_fraction(name: str, value, reader: str) -> None:
    """Refuse a share of the fitting batches outside (0, 1] (or not a number), naming what reads them."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name}={value!r} is the share of the fitting batches {reader} reads; give a number in "
                         "(0, 1], e.g. 0.1, or None for all of them")


@dataclass
class FactorArguments:
    """How curvature factors are fitted. Defaults follow the paper."""

    strategy: Literal["ekfac", "kfac", "diagonal", "identity"] = "ekfac"
    damping_factor: float = 0.1  # lambda_l = damping_factor x mean(Lambda_l)  (paper: 0.1)
    damping: float | None = None  # absolute damping for every layer; overrides damping_factor
    fisher: Literal["sampled", "expected"] = "sampled"  # "expected": exact E_y over classes, one predicted position per example
    seed: int = 0  # for the sampled labels
    dtype: str = "float32"  # accumulation dtype of the covariances and the correction
    progress: bool = True
    checkpoint_every: int = 0  # with an output_dir, save a pass's running sums every K batches (0: only per stage)
    output_blocks: int | None = None  # ekfac/kfac: S block-diagonal over this many equal output blocks (None: full S)
    covariance_fraction: float | None = None  # ekfac/kfac: A and S from the first ceil(f x batches) batches (None: all)
    # ekfac: > 0 reads the data once, keeping every batch's per-token a and g (up to this many bytes, this rank) for the
    # eigenvalue correction, whose labels are then the covariance pass's; 0: a second model pass with its own labels
    token_cache_bytes: int = 0
    correction_fraction: float | None = None  # ekfac: the eigenvalue correction from the first ceil(f x batches) only

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGY_NAMES:
            raise ValueError(f"unknown strategy '{self.strategy}'; choose one of {STRATEGY_NAMES}")
        if self.fisher not in ("sampled", "expected"):
            raise ValueError(f"unknown fisher '{self.fisher}'; choose 'sampled' or 'expected'")
        check_number("damping_factor", self.damping_factor, 0)
        if self.damping is not None:
            check_number("damping", self.damping, 0)
        check_number("seed", self.seed, float("-inf"), integer=True)
        check_number("checkpoint_every", self.checkpoint_every, 0, integer=True)
        if self.output_blocks is not None:
            check_number("output_blocks", self.output_blocks, 1, integer=True)
            if self.strategy not in ("ekfac", "kfac"):
                raise ValueError(f"output_blocks={self.output_blocks} splits the gradient covariance S, which strategy "
                                 f"'{self.strategy}' does not have; use ekfac or kfac, or output_blocks=None")
        if self.covariance_fraction is not None:
            fraction = self.covariance_fraction
            check_fraction("covariance_fraction", fraction, "the covariance pass")
            if self.strategy not in ("ekfac", "kfac"):
                raise ValueError(f"covariance_fraction={fraction!r} subsets the covariance pass, which strategy "
                                 f"'{self.strategy}' does not run; use ekfac or kfac, or covariance_fraction=None")
        if self.correction_fraction is not None:
            fraction = self.correction_fraction
            check_fraction("correction_fraction", fraction, "the eigenvalue correction")
            if self.strategy != "ekfac":
                raise ValueError(f"correction_fraction={fraction!r} subsets the eigenvalue correction of ekfac; "
                                 f"strategy '{self.strategy}' has none to subset: use ekfac, or "
                                 "correction_fraction=None")
        check_number("token_cache_bytes", self.token_cache_bytes, 0, integer=True)
        if self.token_cache_bytes:
            budget = f"token_cache_bytes={self.token_cache_bytes}"
            if self.strategy != "ekfac":
                raise ValueError(f"{budget} keeps tokens for the eigenvalue correction after the covariance pass, "
                                 f"which strategy '{self.strategy}' does not run; use ekfac, or token_cache_bytes=0")
            if self.fisher != "sampled":
                raise ValueError(f"{budget} keeps one pseudo-gradient per token; fisher='{self.fisher}' has one per "
                                 "class. Use fisher='sampled', or token_cache_bytes=0")
            if self.covariance_fraction is not None:
                raise ValueError(f"{budget} reads every batch once for both A, S and the correction; "
                                 f"covariance_fraction={self.covariance_fraction} asks for A and S from fewer. Choose "
                                 "one: covariance_fraction=None, or token_cache_bytes=0")
            if self.checkpoint_every:
                raise ValueError(f"{budget} keeps tokens in memory, which a pass checkpoint cannot restore; use "
                                 "checkpoint_every=0 (finished stages are still saved), or token_cache_bytes=0")
        if self.dtype not in ACCUMULATION_DTYPES:
            raise ValueError(
                f"FactorArguments.dtype={self.dtype!r} is the accumulation dtype of the factors and must be one of "
                f"{ACCUMULATION_DTYPES}; the model's precision is set on the model (e.g. model.to(torch.bfloat16))")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def fitted_settings(self) -> dict:
        """The settings that change the fitted numbers (damping is applied later, so it is not among them)."""
        return {"strategy": self.strategy, "fisher": self.fisher, "seed": self.seed, "dtype": self.dtype,
                "label_sampling": LABEL_SAMPLING, "output_blocks": self.output_blocks,
                "covariance_fraction": self.covariance_fraction, "correction_labels": self.correction_labels,
                "correction_fraction": self.correction_fraction}

    @property
    def correction_labels(self) -> str:
        """Whose sampled labels the eigenvalue correction uses: 'own pass', or with a token cache 'covariance pass'."""
        return "covariance pass" if self.token_cache_bytes else "own pass"


def check_output_blocks(layers: Sequence[TrackedLayer], blocks: int | None) -> None:
    """Refuse an output-block count that does not divide every tracked layer's d_out (blocks are of equal size)."""
    if blocks is None:
        return
    for layer in layers:
        if layer.out_features % blocks:
            raise ValueError(f"output_blocks={blocks} does not divide d_out={layer.out_features} of layer "
                             f"'{layer.name}'; choose a divisor of every tracked layer's output width")


def rotate_tokens_first(tokens: int, d_out: int, d_in: int) -> bool:
    """Whether Q_S^T D_n Q_A is cheaper as (g_t Q_S)(a_t Q_A) summed over tokens, T (d_in^2 + d_out^2) multiply-adds
    per sequence, than by rotating D_n itself, d_out d_in (d_out + d_in): short sequences rotate tokens."""
    return tokens * (d_in * d_in + d_out * d_out) < d_out * d_in * (d_out + d_in)


def gradient_basis(q_s: torch.Tensor, v: torch.Tensor, transpose: bool) -> torch.Tensor:
    """Q_S^T v (transpose) or Q_S v for v (..., d_out, d_in); Q_S (d_out, d_out), or block-diagonal stored (k, b, b)
    with d_out = k b, applied to the k row blocks of v, each (b, d_in), on its own."""
    if q_s.dim() == 2:
        return (q_s.T if transpose else q_s) @ v
    blocks = v.reshape(*v.shape[:-2], q_s.shape[0], q_s.shape[1], v.shape[-1])  # (..., k, b, d_in)
    return ((q_s.mT if transpose else q_s) @ blocks).reshape(v.shape)


def mean_damping(eigenvalues: torch.Tensor, damping_factor: float, damping: float | None) -> float:
    """lambda_l = damping if given, else damping_factor x mean(Lambda_l) (paper: 0.1 x the mean eigenvalue)."""
    return float(damping) if damping is not None else damping_factor * float(eigenvalues.mean())


@dataclass
class LayerFactors:
    """The fitted curvature of one layer; a subclass per basis says how it preconditions (see each)."""

    name: str

    @property
    def shape(self) -> tuple[int, int] | None:
        """(d_out, d_in [+1]) the factors were fitted for; None when they hold no tensor (identity)."""
        return None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to save, keyed '<field>' (the caller prefixes the layer name)."""
        return {}

    def damping_value(self, damping_factor: float, damping: float | None) -> float:
        """The layer's damping lambda_l; 0 without eigenvalues (see mean_damping)."""
        return 0.0

    def precondition(self, v: torch.Tensor, damping: float, power: float = 1.0) -> torch.Tensor:
        """(G_l + damping I)^{-power} v for v (..., d_out, d_in); without curvature (this base): v itself.

        Returned in v's dtype, but never below float32 (a bf16 query gradient gives a float32 preconditioned query:
        rounding it back to 8 bits would undo the fp32 factors).
        """
        return v.to(accumulation_dtype(v.dtype))

    def precondition_query(self, activations: torch.Tensor, output_gradients: torch.Tensor, damping: float,
                           rank: int | None = None) -> torch.Tensor | LowRankQuery:
        """(G_l + damping I)^{-1} D_n for the per-sequence gradients D_n = sum_t g_t a_t^T of a batch of queries,
        a (B, T, d_in), g (B, T, d_out) -> (B, d_out, d_in); with `rank` r, its best rank-r approximation
        (compress_query). Here D_n is formed, preconditioned and truncated; bases may take shorter routes to the
        same numbers (EigenbasisFactors)."""
        preconditioned = self.precondition(per_sequence_gradients(activations, output_gradients), damping)
        return preconditioned if rank is None else compress_query(preconditioned, rank)


@dataclass
class IdentityFactors(LayerFactors):
    """No curvature (strategy identity): scores are plain gradient dot products q^T r."""

    @classmethod
    def from_tensors(cls, name: str, tensors: dict[str, torch.Tensor]) -> "IdentityFactors":
        return cls(name)


@dataclass
class DiagonalFactors(LayerFactors):
    """A diagonal G_l in the parameter basis (strategy diagonal): (G_l + lambda)^{-1} V = V / (Lambda + lambda)."""

    eigenvalues: torch.Tensor  # Lambda (d_out, d_in) = (1/N) sum_n D_n^2

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.eigenvalues.shape[-2:])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"eigenvalues": self.eigenvalues}

    @classmethod
    def from_tensors(cls, name: str, tensors: dict[str, torch.Tensor]) -> "DiagonalFactors":
        return cls(name, tensors[f"{name}.eigenvalues"])

    def damping_value(self, damping_factor: float, damping: float | None) -> float:
        return mean_damping(self.eigenvalues, damping_factor, damping)

    def precondition(self, v: torch.Tensor, damping: float, power: float = 1.0) -> torch.Tensor:
        """V / (Lambda + damping)^power, computed in the factors' dtype (float32 at least on return)."""
        dtype = accumulation_dtype(v.dtype)
        v = v.to(self.eigenvalues.dtype)
        scale = self.eigenvalues.to(v.device) + damping
        return (v / (scale if power == 1.0 else scale ** power)).to(dtype)


@dataclass
class EigenbasisFactors(LayerFactors):
    """A diagonal G_l in the Kronecker eigenbasis (strategies ekfac and kfac), paper Eq 21:

        (G_l + damping I)^{-power} V = Q_S [(Q_S^T V Q_A) / (Lambda + damping)^power] Q_A^T

    power 1: the IHVP, 1/2: a symmetric square root. Q_S is (d_out, d_out), or block-diagonal (k, b, b) with output
    blocks (types.gradient_basis).
    """

    eigenvalues: torch.Tensor  # Lambda (d_out, d_in): EK-FAC (1/N) sum_n (Q_S^T D_n Q_A)^2, K-FAC l_S l_A^T
    activation_eigenvectors: torch.Tensor  # Q_A (d_in, d_in)
    gradient_eigenvectors: torch.Tensor  # Q_S (d_out, d_out), or (k, d_out / k, d_out / k)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.eigenvalues.shape[-2:])

    def damping_value(self, damping_factor: float, damping: float | None) -> float:
        return mean_damping(self.eigenvalues, damping_factor, damping)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"activation_eigenvectors": self.activation_eigenvectors,
                "gradient_eigenvectors": self.gradient_eigenvectors, "eigenvalues": self.eigenvalues}

    @classmethod
    def from_tensors(cls, name: str, tensors: dict[str, torch.Tensor]) -> "EigenbasisFactors":
        return cls(name, tensors[f"{name}.eigenvalues"], tensors[f"{name}.activation_eigenvectors"],
                   tensors[f"{name}.gradient_eigenvectors"])

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Q_A, Q_S, Lambda) on `device` (a no-op where they already are): factors are loaded on the CPU, queries
        live on the model's device."""
        return tuple(t.to(device) for t in (self.activation_eigenvectors, self.gradient_eigenvectors, self.eigenvalues))

    def precondition(self, v: torch.Tensor, damping: float, power: float = 1.0) -> torch.Tensor:
        """Computed in the factors' dtype; returned in v's dtype, but never below float32."""
        dtype = accumulation_dtype(v.dtype)
        v = v.to(self.eigenvalues.dtype)
        q_a, q_s, eigenvalues = self._on(v.device)
        rotated = gradient_basis(q_s, v, transpose=True) @ q_a
        scale = eigenvalues + damping
        rotated = rotated / (scale if power == 1.0 else scale ** power)
        return (gradient_basis(q_s, rotated, transpose=False) @ q_a.T).to(dtype)

    def precondition_query(self, activations: torch.Tensor, output_gradients: torch.Tensor, damping: float,
                           rank: int | None = None) -> torch.Tensor | LowRankQuery:
        """Q_S [(Q_S^T D_n Q_A) / (Lambda + damping)] Q_A^T for a (B, T, d_in), g (B, T, d_out), by two shorter routes
        to the numbers of the base's form-precondition-truncate:

        - short queries rotate their tokens, M_n = sum_t (Q_S^T g_t)(Q_A^T a_t)^T, T (d_in^2 + d_out^2) + T d_out d_in
          multiply-adds, instead of forming D_n and rotating it, T d_out d_in + d_out d_in (d_out + d_in)
          (`rotate_tokens_first`, as the eigenvalue correction);
        - with `rank` r, M_n / (Lambda + damping) is truncated in the eigenbasis and only its factors are rotated back:
          Q_S and Q_A are orthogonal, so the best rank-r approximation of Q_S X Q_A^T is Q_S X_r Q_A^T; r (d_out^2 +
          d_in^2) instead of d_out d_in (d_out + d_in) for the dense rotation back.
        """
        dtype = accumulation_dtype(activations.dtype)
        a, g = activations.to(self.eigenvalues.dtype), output_gradients.to(self.eigenvalues.dtype)
        q_a, q_s, eigenvalues = self._on(a.device)
        block = q_s.shape[-1]
        if rotate_tokens_first(a.shape[1], block, a.shape[2]):
            rotated = gradient_basis(q_s, g.transpose(1, 2), transpose=True) @ (a @ q_a)  # (B, d_out, d_in)
        else:
            rotated = gradient_basis(q_s, per_sequence_gradients(a, g), transpose=True) @ q_a
        rotated = rotated / (eigenvalues + damping)
        if rank is None:
            return (gradient_basis(q_s, rotated, transpose=False) @ q_a.T).to(dtype)
        truncated = compress_query(rotated, rank)
        return LowRankQuery(gradient_basis(q_s, truncated.left, transpose=False).to(dtype).contiguous(),
                            (truncated.right @ q_a.T).to(dtype).contiguous())


@dataclass
class Factors:
    """Fitted factors for a list of tracked layers, plus the manifest that says how they were made."""

    strategy: str
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

    def precondition_query(self, name: str, activations: torch.Tensor, output_gradients: torch.Tensor,
                           rank: int | None = None) -> torch.Tensor | LowRankQuery:
        """Layer `name`'s preconditioned query gradients from their tokens' a and g (LayerFactors.precondition_query)."""
        return self.layers[name].precondition_query(activations, output_gradients, self.damping_for(name), rank)

    def layer_shape(self, name: str) -> tuple[int, int] | None:
        """(d_out, d_in [+1]) the factors of a layer were fitted for: from its tensors, else the manifest; None if unknown."""
        shape = self.layers[name].shape
        if shape is not None:
            return shape
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
