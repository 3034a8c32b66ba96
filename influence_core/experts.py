"""Per-expert layers of a mixture of experts whose expert weights are fused into 3-D parameters.

transformers 5 stores the experts of Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, ... in one module (`mlp.experts`)
with `gate_up_proj` (E, 2 I, H) and `down_proj` (E, H, I): expert e computes

    y_e(x) = down_proj[e] @ (act(gate) * up),   [gate; up] = gate_up_proj[e] @ x

on the tokens routed to it, scaled by its routing weight. There is no module per expert to hook, so
`expert_layers` gives each expert two views, `<experts>.<e>.gate_up_proj` and `<experts>.<e>.down_proj`,
modules whose weight is the slice [e] of the fused parameter, and replaces the experts module's forward by the
eager loop above calling them (the same arithmetic; every expert runs, possibly on no tokens, so each view's
hook fires once per forward). A view records which of the B*T tokens were routed to it; the capture scatters
its input and output gradient back to (B, T, d) with zeros at the other tokens, so an expert's gradient and
covariances are sums over the tokens routed to it (normalised, like every layer's, by all tokens: EK-FAC's
eigenvectors and its corrected eigenvalues do not depend on that normalisation). The routing weight multiplies
the down projection's output, so the output gradient of `down_proj` includes it.

Layouts other than this one (biases, transposed or interleaved weights, no gate, post-expert norms: e.g.
GPT-OSS) are refused with a one-line error naming the module: experts are never skipped silently.
"""

from __future__ import annotations

import inspect
import types

import torch
from torch import nn
from torch.nn import functional as F

VIEWS_ATTRIBUTE = "_influence_expert_views"


def has_fused_experts(module: nn.Module) -> bool:
    """Whether the module itself holds 3-D parameters (stacked per-expert weights)."""
    return any(p.dim() == 3 for p in module.parameters(recurse=False))


class ExpertProjection(nn.Module):
    """Expert `index` of a fused 3-D parameter as a bias-free linear map, weight (d_out, d_in) = fused[index].

    Kept outside the model's module tree (no duplicate entries in state_dict or named_parameters).
    """

    def __init__(self, experts: nn.Module, parameter: str, index: int):
        super().__init__()
        object.__setattr__(self, "experts", experts)  # a plain reference, not a registered submodule
        self.parameter_name = parameter
        self.index = index
        self.routed_tokens: tuple[torch.Tensor, int] | None = None  # (token indices into B*T rows, B*T)

    @property
    def fused(self) -> nn.Parameter:
        return getattr(self.experts, self.parameter_name)

    @property
    def weight(self) -> torch.Tensor:
        return self.fused[self.index]

    bias = None

    @property
    def in_features(self) -> int:
        return self.fused.shape[2]

    @property
    def out_features(self) -> int:
        return self.fused.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fused[self.index])


def _unsupported(name: str, module: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"experts stored as fused 3-D tensors in '{name}' ({type(module).__name__}: {why}) are not tracked yet; "
        "track the other MLP layers instead (module_patterns that do not match this module)")


def _check_layout(name: str, module: nn.Module) -> None:
    params = dict(module.named_parameters(recurse=False))
    gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
    if gate_up is None or down is None or set(params) != {"gate_up_proj", "down_proj"}:
        raise _unsupported(name, module, f"parameters {sorted(params)}, not gate_up_proj and down_proj")
    flags = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
             "has_post_expert_norm": False}
    for flag, wanted in flags.items():
        if getattr(module, flag, wanted) != wanted:
            raise _unsupported(name, module, f"{flag}={getattr(module, flag)}")
    experts, inner2, hidden = gate_up.shape
    if down.shape != (experts, hidden, inner2 // 2) or inner2 % 2:
        raise _unsupported(name, module, f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)}")
    try:
        arguments = list(inspect.signature(type(module).forward).parameters)[1:]
    except (TypeError, ValueError):
        arguments = []
    if arguments[:3] != ["hidden_states", "top_k_index", "top_k_weights"] or not hasattr(module, "act_fn"):
        raise _unsupported(name, module, f"forward({', '.join(arguments)})")


def _routed_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager expert loop, through the per-expert views and over every expert."""
    final = torch.zeros_like(hidden_states)
    rows = hidden_states.shape[0]
    gate = getattr(self, "_apply_gate", None)
    for gate_up, down in getattr(self, VIEWS_ATTRIBUTE):
        with torch.no_grad():
            top_k_position, token_index = torch.where((top_k_index == gate_up.index).T)  # transformers' order
        gate_up.routed_tokens = down.routed_tokens = (token_index, rows)
        hidden = gate_up(hidden_states[token_index])
        if gate is not None:
            hidden = gate(hidden)
        else:
            g, u = hidden.chunk(2, dim=-1)
            hidden = self.act_fn(g) * u
        hidden = down(hidden) * top_k_weights[token_index, top_k_position, None]
        final.index_add_(0, token_index, hidden.to(final.dtype))
    return final


def expert_views(name: str, module: nn.Module) -> list[tuple[str, ExpertProjection]]:
    """[(f"{name}.{e}.gate_up_proj", view), (f"{name}.{e}.down_proj", view), ...] for every expert e.

    Installs the routed forward on the module (once); raises a one-line error for an unsupported layout.
    """
    _check_layout(name, module)
    views = module.__dict__.get(VIEWS_ATTRIBUTE)
    if views is None:
        views = [(ExpertProjection(module, "gate_up_proj", e), ExpertProjection(module, "down_proj", e))
                 for e in range(module.gate_up_proj.shape[0])]
        object.__setattr__(module, VIEWS_ATTRIBUTE, views)
        object.__setattr__(module, "forward", types.MethodType(_routed_forward, module))
    return [(f"{name}.{view.index}.{view.parameter_name}", view) for pair in views for view in pair]
