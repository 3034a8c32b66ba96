"""Which layers influence is computed over, and how their activations and output gradients are captured.

A tracked layer is an affine map `s = W a + b` (`nn.Linear`, or the GPT-2 `Conv1D` of transformers, which
stores W transposed). Everything downstream works in one canonical layout per layer:

    gradient of a loss w.r.t. (W, b)  =  sum_t g_t a_t^T,   shape (d_out, d_in + 1)

where `a_t` is the layer input at token t with a homogeneous 1 appended for the bias (paper App A) and `g_t`
the gradient of the loss w.r.t. the layer output at token t. The engine never reads parameter `.grad`: it
captures `a` with a forward hook and gets `g` from `torch.autograd.grad(loss, outputs)`, which skips the
weight-gradient matmuls of an ordinary backward pass.
"""

from __future__ import annotations

import fnmatch
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from .batch import sequence_shape
from .distributed import weight_sample

MLP_PATTERNS: tuple[str, ...] = ("*mlp*",)
"""Default selection, as in the paper: the MLP layers of a transformer (GPT-NeoX, GPT-2, LLaMA naming)."""

ATTENTION_PATTERNS: tuple[str, ...] = ("*attention*", "*attn*")
"""Add these to also track attention projections (query/key/value/output)."""


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: y = x @ weight + bias, weight (d_in, d_out). Matched by name to avoid a hard import.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


@dataclass(frozen=True)
class TrackedLayer:
    """One affine layer whose parameters influence is attributed to."""

    name: str  # module path, e.g. "gpt_neox.layers.3.mlp.dense_h_to_4h"
    module: nn.Module
    in_features: int
    out_features: int
    has_bias: bool
    transposed_weight: bool  # True for GPT-2 Conv1D (weight stored as (d_in, d_out))

    @property
    def input_dim(self) -> int:
        """d_in + 1 with a bias (the homogeneous coordinate), else d_in."""
        return self.in_features + int(self.has_bias)

    @property
    def num_parameters(self) -> int:
        return self.out_features * self.input_dim

    def canonical_gradient(self, weight_grad: torch.Tensor, bias_grad: torch.Tensor | None) -> torch.Tensor:
        """Parameter-space gradient -> canonical layout (..., d_out, d_in [+1]); bias is the last column."""
        w = weight_grad.transpose(-1, -2) if self.transposed_weight else weight_grad
        if self.has_bias:
            assert bias_grad is not None
            w = torch.cat([w, bias_grad.unsqueeze(-1)], dim=-1)
        return w


def track_layers(model: nn.Module, patterns: Sequence[str] = MLP_PATTERNS) -> list[TrackedLayer]:
    """Select the affine layers whose module path matches any glob pattern (fnmatch, e.g. "*mlp*").

    Raises ValueError naming the patterns and some available layers when nothing matches.
    """
    if isinstance(patterns, str):
        patterns = (patterns,)
    layers: list[TrackedLayer] = []
    affine_names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            in_f, out_f, transposed = module.in_features, module.out_features, False
        elif _is_conv1d(module):
            in_f, out_f, transposed = module.weight.shape[0], module.weight.shape[1], True
        else:
            continue
        affine_names.append(name)
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            layers.append(TrackedLayer(name, module, in_f, out_f, module.bias is not None, transposed))
    if not layers:
        shown = ", ".join(affine_names[:12]) + (" ..." if len(affine_names) > 12 else "")
        raise ValueError(
            f"no tracked module matched the patterns {list(patterns)}; the model's linear layers are: "
            f"[{shown or 'none'}]. Pass module_patterns that match some of them (fnmatch globs, e.g. '*mlp*')."
        )
    return layers


def tracked_parameters(layers: Sequence[TrackedLayer]) -> list[torch.Tensor]:
    """[weight_0, bias_0, weight_1, ...] of the tracked layers (bias only where the layer has one)."""
    params = []
    for layer in layers:
        params.append(layer.module.weight)
        if layer.has_bias:
            params.append(layer.module.bias)
    return params


def model_fingerprint(layers: Sequence[TrackedLayer]) -> str:
    """A short hash of the tracked layers' names, shapes and (a strided sample of) their weights.

    Used to refuse factor files fitted on another model. Sampling keeps it cheap for billion-parameter models.
    """
    digest = hashlib.sha256()
    for layer in layers:
        weight = layer.module.weight.detach()
        digest.update(f"{layer.name}:{tuple(weight.shape)}:{layer.has_bias};".encode())
        digest.update(weight_sample(layer.module.weight).numpy().tobytes())
    return digest.hexdigest()[:16]


def layer_fingerprints(layers: Sequence[TrackedLayer]) -> dict[str, str]:
    """{layer name: model_fingerprint([layer])}: per-layer fingerprints, so a subset of the layers can be checked."""
    return {layer.name: model_fingerprint([layer]) for layer in layers}


@contextmanager
def tracked_parameters_require_grad(layers: Sequence[TrackedLayer]) -> Iterator[None]:
    """Make the tracked weights require grad (so their outputs join the graph) and restore the flags after."""
    saved = []
    for layer in layers:
        for p in layer.module.parameters(recurse=False):
            saved.append((p, p.requires_grad))
            p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


class LayerCapture:
    """Forward hooks on the tracked layers that keep, for the current forward pass:

    - `activations[name]`: the input with a homogeneous 1 appended, detached, shape (B, T, d_in [+1]).
      A 2-D input is either (B, d_in), one token per row (T = 1), or tokens flattened across the batch,
      (B * T, d_in), as OPT's fc1/fc2 get them; it is reshaped to (B, T, d_in). Telling the two apart needs the
      batch shape (B, T) of the current forward: pass the batch to `clear(batch)` before the forward (its
      2-D input_ids give it). Without it a 2-D input is taken as (B, d_in).
    - `outputs[name]`: the output tensor as produced, still in the graph, (B, T, d_out), (B * T, d_out) or (B, d_out).

    `output_gradients(loss)` then returns g = d loss / d output for every tracked layer, (B, T, d_out).
    Use as a context manager; hooks are removed on exit.
    """

    def __init__(self, layers: Sequence[TrackedLayer]):
        self.layers = list(layers)
        self.activations: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self.sequence_shape: tuple[int, int] | None = None  # (B, T) of the current forward, when known

    def _hook(self, layer: TrackedLayer):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if layer.name in self.outputs:
                raise RuntimeError(
                    f"tracked layer '{layer.name}' ran twice in one forward pass; shared layers are not supported"
                )
            x = self._as_sequences(layer, inputs[0].detach())
            if layer.has_bias:
                x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
            self.activations[layer.name] = x
            self.outputs[layer.name] = output  # as produced: the loss depends on this tensor, not on a reshaped view

        return hook

    def _as_sequences(self, layer: TrackedLayer, x: torch.Tensor) -> torch.Tensor:
        """A layer input as (B, T, d_in): 3-D kept, 2-D (B, d_in) -> (B, 1, d_in), (B * T, d_in) -> (B, T, d_in)."""
        if x.dim() != 2:
            return x
        if self.sequence_shape is None:
            return x.unsqueeze(1)
        rows, tokens = self.sequence_shape
        if x.shape[0] == rows * tokens:
            return x.reshape(rows, tokens, x.shape[-1])
        if x.shape[0] == rows:
            return x.unsqueeze(1)
        raise ValueError(
            f"tracked layer '{layer.name}' got a 2-D input of {x.shape[0]} rows for a batch of {rows} sequences of "
            f"{tokens} tokens: neither one row per sequence ({rows}) nor one per token ({rows * tokens}); "
            "track layers whose inputs keep the sequence and token dimensions"
        )

    def __enter__(self) -> "LayerCapture":
        self._handles = [l.module.register_forward_hook(self._hook(l)) for l in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def clear(self, batch=None) -> None:
        """Forget the last forward; with `batch`, the next forward is of that batch (sets its (B, T))."""
        self.activations.clear()
        self.outputs.clear()
        self.sequence_shape = sequence_shape(batch) if batch is not None else None

    def output_gradients(self, loss: torch.Tensor, retain_graph: bool = False) -> dict[str, torch.Tensor]:
        """g_l = d loss / d s_l for each tracked layer l, shape (B, T, d_out)."""
        missing = [l.name for l in self.layers if l.name not in self.outputs]
        if missing:
            raise RuntimeError(f"tracked layers {missing} did not run in the forward pass")
        names = [l.name for l in self.layers]
        outputs = [self.outputs[n] for n in names]
        for name, out in zip(names, outputs):
            if not out.requires_grad:
                raise RuntimeError(
                    f"the output of tracked layer '{name}' is not in the autograd graph; "
                    "run the forward pass with gradients enabled"
                )
        grads = torch.autograd.grad(loss, outputs, retain_graph=retain_graph, allow_unused=True)
        result = {}
        for name, out, g in zip(names, outputs, grads):
            # A layer that does not affect the loss (e.g. after the last predicted token) has zero gradient.
            g = torch.zeros_like(out) if g is None else g.detach()
            result[name] = g.reshape(self.activations[name].shape[0], -1, g.shape[-1])
        return result
