"""Which layers influence is computed over, and how their activations and output gradients are captured.

A tracked layer is an affine map `s = W a + b` (`nn.Linear`, or the GPT-2 `Conv1D` of transformers, which
stores W transposed). Everything downstream works in one canonical layout per layer:

    gradient of a loss w.r.t. (W, b)  =  sum_t g_t a_t^T,   shape (d_out, d_in + 1)

where `a_t` is the layer input at token t with a homogeneous 1 appended for the bias (paper App A) and `g_t`
the gradient of the loss w.r.t. the layer output at token t. The engine never reads parameter `.grad`: it
captures `a` with a forward hook and gets `g` from `torch.autograd.grad(loss, outputs)`, which skips the
weight-gradient matmuls of an ordinary backward pass.

Which layers: `track_layers(model)` takes the model family's MLP layers from the registry in families.py
(keyed by config.model_type; attention, embedding and unembedding are opt-in groups), or the modules matching
given glob patterns. Experts stored as fused 3-D parameters become one tracked layer per expert and projection
(experts.py); their inputs are the tokens routed to them, scattered back to (B, T, d) by the capture.
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
from .experts import ExpertProjection, expert_views, has_fused_experts
from .families import family_patterns

MLP_PATTERNS: tuple[str, ...] = ("*mlp*",)
"""A name-based selection of MLP layers (GPT-NeoX, GPT-2, LLaMA naming); the default is the family registry."""

ATTENTION_PATTERNS: tuple[str, ...] = ("*attention*", "*attn*")
"""Add these to also track attention projections (query/key/value/output)."""

MAX_EMBEDDING_VOCABULARY = 8192
"""An embedding's activation covariance is V x V (its one-hot inputs): larger vocabularies are refused."""


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
    expert_index: int | None = None  # a view of expert e of a fused 3-D parameter (experts.py), else None
    members: tuple[nn.Module, ...] = ()  # an input-sharing block (share_inputs): modules reading one input
    one_hot: bool = False  # an nn.Embedding: s = W e_token, its input the token's one-hot vector (V,)

    @property
    def modules(self) -> tuple[nn.Module, ...]:
        """The modules whose parameters this layer is: the block's members, or the one module."""
        return self.members or (self.module,)

    @property
    def member_out_features(self) -> tuple[int, ...]:
        """d_out of each module, in order; a block's output is their concatenation (out_features their sum)."""
        if not self.members:
            return (self.out_features,)
        return tuple(m.weight.shape[1] if self.transposed_weight else m.weight.shape[0] for m in self.members)

    @property
    def input_dim(self) -> int:
        """d_in + 1 with a bias (the homogeneous coordinate), else d_in."""
        return self.in_features + int(self.has_bias)

    @property
    def num_parameters(self) -> int:
        return self.out_features * self.input_dim

    def canonical_gradient(self, weight_grad, bias_grad) -> torch.Tensor:
        """Parameter-space gradient -> canonical layout (..., d_out, d_in [+1]); bias is the last column.
        A block takes one (weight, bias) gradient per member (sequences) and stacks the members' rows."""
        if self.members:
            return torch.cat([TrackedLayer(self.name, m, self.in_features, out, self.has_bias, self.transposed_weight)
                              .canonical_gradient(w, b) for m, out, w, b in
                              zip(self.members, self.member_out_features, weight_grad,
                                  bias_grad if self.has_bias else [None] * len(self.members))], dim=-2)
        if self.expert_index is not None:  # a gradient w.r.t. the fused (E, d_out, d_in) parameter: its slice [e]
            weight_grad = weight_grad[..., self.expert_index, :, :]
        w = weight_grad.transpose(-1, -2) if self.transposed_weight else weight_grad
        if self.has_bias:
            assert bias_grad is not None
            w = torch.cat([w, bias_grad.unsqueeze(-1)], dim=-1)
        return w


def track_layers(model: nn.Module, patterns: Sequence[str] | None = None,
                 groups: Sequence[str] = ("mlp",)) -> list[TrackedLayer]:
    """The affine layers influence is attributed to, in module order.

    patterns: fnmatch globs over module paths (e.g. "*mlp*"); a layer is tracked when its path matches one.
    None: the registry's globs for the model's family (families.FAMILIES[config.model_type]) and `groups`
    (default the MLP layers, as in the paper); an unknown family is refused with a one-line error. A matched
    module holding fused expert weights (3-D parameters) is tracked as one layer per expert and projection.
    Raises ValueError naming the patterns and some available layers when nothing matches.
    """
    from_registry = patterns is None
    if from_registry:
        patterns = family_patterns(model, groups)
    elif isinstance(patterns, str):
        patterns = (patterns,)
    layers: list[TrackedLayer] = []
    affine_names: list[str] = []
    fused: list[str] = []
    for name, module in model.named_modules():
        matched = any(fnmatch.fnmatchcase(name, p) for p in patterns)
        if has_fused_experts(module):
            fused.append(name)
            if matched:
                for view_name, view in expert_views(name, module):
                    layers.append(TrackedLayer(view_name, view, view.in_features, view.out_features, False, False,
                                               view.index))
            continue
        if isinstance(module, nn.Linear):
            in_f, out_f, transposed = module.in_features, module.out_features, False
        elif _is_conv1d(module):
            in_f, out_f, transposed = module.weight.shape[0], module.weight.shape[1], True
        else:
            if from_registry and matched and isinstance(module, nn.Embedding):
                layers.append(_embedding_layer(name, module))
            continue
        affine_names.append(name)
        if matched:
            layers.append(TrackedLayer(name, module, in_f, out_f, module.bias is not None, transposed))
    if not layers:
        shown = ", ".join(affine_names[:12]) + (" ..." if len(affine_names) > 12 else "")
        source = f"the registry's {list(groups)} of model_type '{model.config.model_type}' " if from_registry else ""
        raise ValueError(
            f"no tracked module matched {source}the patterns {list(patterns)}; the model's linear layers are: "
            f"[{shown or 'none'}]. Pass module_patterns that match some of them (fnmatch globs, e.g. '*mlp*')."
        )
    if from_registry:
        _check_registry_selection(model, layers, fused, groups)
    return layers


def _embedding_layer(name: str, module: nn.Embedding) -> TrackedLayer:
    """An nn.Embedding as an affine layer over one-hot token inputs: weight (V, d) = W^T, d_in = V, d_out = d, no
    bias; the capture turns its token ids into one-hot rows. Refused, with the fix, for vocabularies whose V x V
    activation covariance would not fit (above MAX_EMBEDDING_VOCABULARY)."""
    if module.num_embeddings > MAX_EMBEDDING_VOCABULARY:
        raise ValueError(f"'{name}' has a vocabulary of {module.num_embeddings:,} tokens: its one-hot inputs make a "
                         f"{module.num_embeddings:,}^2 activation covariance (limit {MAX_EMBEDDING_VOCABULARY:,}); "
                         "leave out the 'embedding' group for this model")
    return TrackedLayer(name, module, module.num_embeddings, module.embedding_dim, False, True, one_hot=True)


def share_inputs(layers: Sequence[TrackedLayer], groups: Sequence[Sequence[str]]) -> list[TrackedLayer]:
    """Input-sharing blocks: each group of tracked layers that read the same input (e.g. a SwiGLU MLP's gate_proj
    and up_proj, or attention's q/k/v) becomes one layer s = [W_1; W_2; ...] a, whose output is the members'
    concatenated and whose d_out is their sum. EK-FAC then keeps the curvature between the members: one activation
    covariance A (shared by construction), one gradient covariance S over the joint output, the eigenvalue
    correction in their joint eigenbasis, instead of dropping the cross-block terms.

    groups: lists of layer-name suffixes matched within one parent module, e.g. [["gate_proj", "up_proj"]]; the
    block takes the place of its first member, named "<parent>.<m1>+<m2>". Members must have the same d_in, bias
    and layout; the capture refuses, at the first forward, members whose inputs differ.
    """
    by_name = {l.name: l for l in layers}
    blocks: dict[str, TrackedLayer] = {}
    absorbed: set[str] = set()
    for suffixes in groups:
        parents = {l.name[: -len(suffixes[0]) - 1] for l in layers if l.name.endswith("." + suffixes[0])}
        for parent in sorted(parents):
            members = [by_name.get(f"{parent}.{suffix}") for suffix in suffixes]
            if any(m is None for m in members):
                missing = [f"{parent}.{s}" for s, m in zip(suffixes, members) if m is None]
                raise ValueError(f"input-sharing group {list(suffixes)}: {missing[0]} is not a tracked layer; track "
                                 "every member (module_patterns) or drop the group")
            first = members[0]
            if any((m.in_features, m.has_bias, m.transposed_weight, m.expert_index) !=
                   (first.in_features, first.has_bias, first.transposed_weight, None) for m in members):
                raise ValueError(f"input-sharing group {[m.name for m in members]}: members differ in d_in, bias or "
                                 "layout (or are expert views); only plain layers reading one input can share")
            name = f"{parent}.{'+'.join(suffixes)}"
            blocks[first.name] = TrackedLayer(name, first.module, first.in_features,
                                              sum(m.out_features for m in members), first.has_bias,
                                              first.transposed_weight, None, tuple(m.module for m in members))
            absorbed.update(m.name for m in members[1:])
    return [blocks.get(l.name, l) for l in layers if l.name not in absorbed]


def _check_registry_selection(model: nn.Module, layers: Sequence[TrackedLayer], fused: Sequence[str],
                              groups: Sequence[str]) -> None:
    """Refuse what the registry would get silently wrong: untracked experts, a tied unembedding."""
    tracked = {l.name.rsplit(".", 2)[0] for l in layers if l.expert_index is not None}
    missed = [name for name in fused if name not in tracked]
    if "mlp" in groups and missed:
        raise ValueError(f"the experts in '{missed[0]}' are not in the registry's MLP globs for model_type "
                         f"'{model.config.model_type}'; pass module_patterns that include them")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for layer in layers:
        if layer.one_hot and head is not None and layer.module.weight is getattr(head, "weight", None):
            raise ValueError(f"'{layer.name}' shares its weight with the output head (tie_word_embeddings), so its "
                             "gradient would miss the head's part; untie the weights or leave out the 'embedding' group")
    if "unembedding" in groups:
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        for layer in layers:
            if embedding is not None and layer.module.weight is getattr(embedding, "weight", None):
                raise ValueError(f"'{layer.name}' shares its weight with the input embedding (tie_word_embeddings), so "
                                 "its gradient would miss the embedding's part; untie the weights or leave out the "
                                 "'unembedding' group")


def refuse_expert_views(layers: Sequence[TrackedLayer], what: str) -> None:
    """One-line error where a method needs each layer's own parameter tensor (not a slice of a fused one)."""
    views = [l.name for l in layers if l.expert_index is not None]
    if views:
        raise ValueError(f"{what} does not support experts stored as fused 3-D tensors (e.g. '{views[0]}'); "
                         "track the other layers for it")


def tracked_parameters(layers: Sequence[TrackedLayer]) -> list[torch.Tensor]:
    """[weight_0, bias_0, weight_1, ...] of the tracked layers (bias only where the layer has one).

    For an expert view (expert_index set) the weight entry is the fused (E, d_out, d_in) parameter.
    """
    params = []
    for layer in layers:
        if layer.expert_index is not None:  # an expert view's parameter is the whole fused tensor; its slice is taken
            params.append(layer.module.fused)
            continue
        for module in layer.modules:  # a block: each member's weight (and bias) in turn
            params.append(module.weight)
            if layer.has_bias:
                params.append(module.bias)
    return params


def model_fingerprint(layers: Sequence[TrackedLayer]) -> str:
    """A short hash of the tracked layers' names, shapes and (a strided sample of) their weights.

    Used to refuse factor files fitted on another model. Sampling keeps it cheap for billion-parameter models.
    """
    digest = hashlib.sha256()
    for layer in layers:
        for module in layer.modules:
            weight = module.weight.detach()
            digest.update(f"{layer.name}:{tuple(weight.shape)}:{layer.has_bias};".encode())
            digest.update(weight_sample(module.weight).numpy().tobytes())
    return digest.hexdigest()[:16]


def layer_fingerprints(layers: Sequence[TrackedLayer]) -> dict[str, str]:
    """{layer name: model_fingerprint([layer])}: per-layer fingerprints, so a subset of the layers can be checked."""
    return {layer.name: model_fingerprint([layer]) for layer in layers}


@contextmanager
def tracked_parameters_require_grad(layers: Sequence[TrackedLayer]) -> Iterator[None]:
    """Make the tracked weights require grad (so their outputs join the graph) and restore the flags after."""
    saved = []
    for layer in layers:
        own = [layer.module.fused] if layer.expert_index is not None else [
            p for module in layer.modules for p in module.parameters(recurse=False)]
        for p in own:
            saved.append((p, p.requires_grad))
            p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in reversed(saved):  # reversed: a tensor listed twice (a fused expert tensor) gets its first flag
            p.requires_grad_(flag)


class LayerCapture:
    """Forward hooks on the tracked layers that keep, for the current forward pass:

    - `activations[name]`: the input with a homogeneous 1 appended, detached, shape (B, T, d_in [+1]).
      A 2-D input is either (B, d_in), one token per row (T = 1), or tokens flattened across the batch,
      (B * T, d_in), as OPT's fc1/fc2 get them; it is reshaped to (B, T, d_in). Telling the two apart needs the
      batch shape (B, T) of the current forward: pass the batch to `clear(batch)` before the forward (its
      2-D input_ids give it). Without it a 2-D input is taken as (B, d_in).
    - `outputs[name]`: the output tensor as produced, still in the graph, (B, T, d_out), (B * T, d_out) or (B, d_out).
    - An expert view (experts.py) runs on the tokens routed to it, (n_e, d_in); its input and output gradient are
      scattered back to the B * T token rows, zeros at tokens routed elsewhere, then treated as above.

    `output_gradients(loss)` then returns g = d loss / d output for every tracked layer, (B, T, d_out).
    Use as a context manager; hooks are removed on exit.
    """

    def __init__(self, layers: Sequence[TrackedLayer]):
        self.layers = list(layers)
        self.activations: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self.routes: dict[str, tuple[torch.Tensor, int]] = {}  # expert views: (routed token rows, B * T)
        self._block_inputs: dict[str, torch.Tensor] = {}  # input-sharing blocks: the first member's input
        self.sequence_shape: tuple[int, int] | None = None  # (B, T) of the current forward, when known

    def _hook(self, layer: TrackedLayer, member: int | None = None):
        if member is not None:
            return self._member_hook(layer, member)

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if layer.name in self.outputs:
                raise RuntimeError(
                    f"tracked layer '{layer.name}' ran twice in one forward pass; shared layers are not supported"
                )
            x = inputs[0].detach()
            if layer.one_hot:  # token ids (B, T) -> one-hot rows (B, T, V) in the output's dtype
                x = torch.nn.functional.one_hot(x, layer.in_features).to(output.dtype)
            route = getattr(module, "routed_tokens", None) if isinstance(module, ExpertProjection) else None
            if route is not None:
                self.routes[layer.name] = route
                x = _scatter_rows(x, *route)
            x = self._as_sequences(layer, x)
            if layer.has_bias:
                x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
            self.activations[layer.name] = x
            self.outputs[layer.name] = output  # as produced: the loss depends on this tensor, not on a reshaped view

        return hook

    def _member_hook(self, layer: TrackedLayer, member: int):
        """Member `member` of an input-sharing block: the first keeps the input as the block's activation, every
        member its output (the block's output is their concatenation); an input unlike the first's is refused."""
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            outputs = self.outputs.setdefault(layer.name, [None] * len(layer.members))
            if outputs[member] is not None:
                raise RuntimeError(f"tracked layer '{layer.name}' ran twice in one forward pass; shared layers are "
                                   "not supported")
            x = inputs[0].detach()
            if member == 0:
                x = self._as_sequences(layer, x)
                if layer.has_bias:
                    x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
                self.activations[layer.name] = x
                self._block_inputs[layer.name] = inputs[0]
            else:
                first = self._block_inputs.get(layer.name)
                if first is None or (first is not inputs[0] and not torch.equal(first, inputs[0])):
                    raise RuntimeError(f"input-sharing block '{layer.name}': member {member} reads another input "
                                       "than the first member (or runs before it); these layers cannot share a block")
            outputs[member] = output

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
        self._handles = []
        for l in self.layers:
            if l.members:
                self._handles += [m.register_forward_hook(self._hook(l, i)) for i, m in enumerate(l.members)]
            else:
                self._handles.append(l.module.register_forward_hook(self._hook(l)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def clear(self, batch=None) -> None:
        """Forget the last forward; with `batch`, the next forward is of that batch (sets its (B, T))."""
        self.activations.clear()
        self.outputs.clear()
        self._block_inputs.clear()
        self.routes.clear()
        self.sequence_shape = sequence_shape(batch) if batch is not None else None

    def output_gradients(self, loss: torch.Tensor, retain_graph: bool = False) -> dict[str, torch.Tensor]:
        """g_l = d loss / d s_l for each tracked layer l, shape (B, T, d_out)."""
        missing = [l.name for l in self.layers if l.name not in self.outputs]
        if missing:
            raise RuntimeError(f"tracked layers {missing} did not run in the forward pass")
        names, outputs = [], []  # one entry per output tensor (a block has one per member)
        for layer in self.layers:
            produced = self.outputs[layer.name]
            for out in (produced if layer.members else [produced]):
                if out is None:
                    raise RuntimeError(f"a member of input-sharing block '{layer.name}' did not run in the forward pass")
                names.append(layer.name)
                outputs.append(out)
        for name, out in zip(names, outputs):
            if not out.requires_grad:
                raise RuntimeError(
                    f"the output of tracked layer '{name}' is not in the autograd graph; "
                    "run the forward pass with gradients enabled"
                )
        grads = torch.autograd.grad(loss, outputs, retain_graph=retain_graph, allow_unused=True)
        pieces: dict[str, list[torch.Tensor]] = {}
        for name, out, g in zip(names, outputs, grads):
            # A layer that does not affect the loss (e.g. after the last predicted token) has zero gradient.
            g = torch.zeros_like(out) if g is None else g.detach()
            if name in self.routes:
                g = _scatter_rows(g, *self.routes[name])
            pieces.setdefault(name, []).append(g.reshape(self.activations[name].shape[0], -1, g.shape[-1]))
        return {name: parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1) for name, parts in pieces.items()}


def per_sequence_gradients(activations: torch.Tensor, output_gradients: torch.Tensor,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """D_n = sum_t g_t a_t^T, the canonical per-sequence gradient: a (B, T, d_in), g (B, T, d_out) -> (B, d_out, d_in),
    written into `out` (a contiguous (B, d_out, d_in) tensor) when given.

    One batched matmul on the strided g^T (torch.einsum copied its operands into another layout first).
    """
    return torch.bmm(output_gradients.transpose(1, 2), activations, out=out)


def _scatter_rows(x: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """(n, d) values of the rows `index` -> (rows, d), zeros elsewhere."""
    return x.new_zeros(rows, x.shape[-1]).index_copy_(0, index, x.reshape(-1, x.shape[-1]))
