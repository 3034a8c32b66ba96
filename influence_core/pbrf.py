"""The proximal Bregman response function (paper Eq 7), solved by optimisation: the target influence estimates.

    theta(eps) = argmin_theta  (1/N) sum_i D_L(h(theta, x_i), h(theta_s, x_i)) + eps L(z_m, theta)
                               + (1/2) sum_p lambda_p (theta_p - theta_s,p)^2

over the tracked parameters only (everything else frozen), starting from the trained weights theta_s. For
softmax cross-entropy on logits h the Bregman divergence is D_L(h, h_s) = KL(softmax(h_s) || softmax(h)), summed
over the predicted positions of a sequence. Its Hessian at theta_s is G + lambda (G with the normalisation of
`baselines.exact_gauss_newton`), so theta(eps) - theta_s = -eps (G + lambda)^{-1} grad L(z_m) + O(eps^2) and

    PBRF influence = (f(theta(+eps)) - f(theta(-eps))) / (2 eps),    f = log p(completion | prompt)

equals the engine's score q^T (G + lambda)^{-1} r up to O(eps^2) (central difference cancels the eps^2 term).

The solve is done in the rescaled variable delta = (theta - theta_s) / eps, objective divided by eps^2, so that
gradients are O(1) whatever eps is and optimiser tolerances mean the same thing:

    J(delta) = (1/eps^2) (1/N) sum_i KL_i + (1/eps) (L(z_m, theta) - L(z_m, theta_s)) + (1/2) sum_p lambda_p delta_p^2
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from .factors import check_finite, to_device
from .gnh import flat_to_parameters, num_tracked_parameters
from .task import IGNORE_INDEX, Batch, Task
from .tracking import TrackedLayer


@dataclass
class PBRFArguments:
    """How the PBRF is solved. L-BFGS (full batch, strong-Wolfe line search) converges in tens of iterations on
    small models; Adam is the paper's choice for the 810M LM."""

    epsilon: float = 1e-3  # weight of the up-weighted training sequence's loss
    optimizer: Literal["lbfgs", "adam"] = "lbfgs"
    max_iterations: int = 300
    gradient_tolerance: float = 1e-7  # stop when max |grad J(delta)| falls below this
    learning_rate: float = 0.05  # Adam only (in units of delta)
    history_size: int = 50  # L-BFGS memory
    central: bool = True  # +eps and -eps (central difference); False: forward difference with +eps only
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epsilon <= 0:
            raise ValueError(f"epsilon must be positive, got {self.epsilon}")
        if self.optimizer not in ("lbfgs", "adam"):
            raise ValueError(f"unknown optimizer '{self.optimizer}'; choose 'lbfgs' or 'adam'")
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {self.max_iterations}")


@dataclass
class PBRFResult:
    influence: torch.Tensor  # (Q, M): PBRF influence of training example m on query q
    gradient_norms: torch.Tensor  # (M, 2): final max |grad J| of the +eps and -eps solves
    iterations: torch.Tensor  # (M, 2)
    seconds: float


def _parameter_names(model: nn.Module, layers: Sequence[TrackedLayer]) -> list[str]:
    by_module = {id(module): name for name, module in model.named_modules()}
    names = []
    for layer in layers:
        prefix = by_module[id(layer.module)]
        names.append(f"{prefix}.weight")
        if layer.has_bias:
            names.append(f"{prefix}.bias")
    return names


def _kl_to_reference(logits: torch.Tensor, labels: torch.Tensor, reference_log_probs: torch.Tensor) -> torch.Tensor:
    """sum over valid positions of KL(softmax(h_s) || softmax(h)); logits (B, T, C), reference (B, T, C)."""
    valid = (labels != IGNORE_INDEX).unsqueeze(-1)
    log_q = torch.log_softmax(logits.double(), dim=-1)
    kl = reference_log_probs.exp() * (reference_log_probs - log_q)
    return (kl * valid).sum()


def query_log_probs(model: nn.Module, task: Task, queries: Sequence[Batch]) -> torch.Tensor:
    """f = -query_loss of each query row (log p(completion | prompt)), (Q,), in float64."""
    values = []
    with torch.no_grad():
        for batch in queries:
            batch = to_device(batch, model)
            size = len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))
            for i in range(size):
                row = {k: v[i : i + 1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                values.append(-float(task.query_loss(model, row)))
    return torch.tensor(values, dtype=torch.float64)


def pbrf_influence(model: nn.Module, layers: Sequence[TrackedLayer], task: Task, data: Sequence[Batch],
                   examples: Sequence[Batch], queries: Sequence[Batch], damping: float | torch.Tensor,
                   args: PBRFArguments | None = None) -> PBRFResult:
    """PBRF influence of each training example (each a batch of one sequence) on each query row, (Q, M).

    data: the batches that define the Bregman term (the training set the curvature refers to); damping:
    lambda, a scalar or a (P,) vector in the canonical flat layout (e.g. per-layer lambda_l). The model's
    weights are restored afterwards.
    """
    args = args or PBRFArguments()
    layers = list(layers)
    data = list(data)
    if not data or not examples:
        raise ValueError("pbrf_influence needs non-empty data and examples")
    damping_params = [d.detach() for d in flat_to_parameters(
        layers, torch.as_tensor(damping, dtype=torch.float64).expand(num_tracked_parameters(layers)).clone())]
    names = _parameter_names(model, layers)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)  # only delta is differentiated
    model.eval()
    start = time.perf_counter()
    try:
        data = [to_device(b, model) for b in data]
        with torch.no_grad():
            reference = []
            num_sequences = 0
            for batch in data:
                logits, labels = task.forward(model, batch)
                reference.append(torch.log_softmax(logits.double(), dim=-1))
                num_sequences += logits.shape[0]
        f_base = query_log_probs(model, task, queries)
        signs = (1.0, -1.0) if args.central else (1.0,)
        influence = torch.zeros(len(f_base), len(examples), dtype=torch.float64)
        grad_norms = torch.zeros(len(examples), len(signs))
        iterations = torch.zeros(len(examples), len(signs), dtype=torch.long)
        bar = tqdm(total=len(examples) * len(signs), desc="PBRF solves", disable=not args.progress, leave=False)
        for m, example in enumerate(examples):
            example = to_device(example, model)
            with torch.no_grad():
                loss_base = task.training_loss(model, example).double()
            f_values = []
            for j, sign in enumerate(signs):
                eps = sign * args.epsilon
                delta = [torch.zeros_like(base[n], requires_grad=True) for n in names]

                def objective_and_grad() -> torch.Tensor:
                    def params() -> dict[str, torch.Tensor]:  # a fresh graph per backward pass
                        return {n: base[n] + eps * d for n, d in zip(names, delta)}

                    for d in delta:
                        d.grad = torch.zeros_like(d)
                    total = 0.0
                    for batch, ref in zip(data, reference):
                        logits, labels = task.forward(_Bound(model, params()), batch)
                        part = _kl_to_reference(logits, labels, ref) / (num_sequences * eps * eps)
                        grads = torch.autograd.grad(part, delta)
                        for d, g in zip(delta, grads):
                            d.grad += g
                        total += float(part.detach())
                    logits_loss = task.training_loss(_Bound(model, params()), example).double()
                    part = (logits_loss - loss_base) / eps
                    part = part + 0.5 * sum((lam * d.double() ** 2).sum() for lam, d in zip(damping_params, delta))
                    grads = torch.autograd.grad(part, delta)
                    for d, g in zip(delta, grads):
                        d.grad += g
                    total += float(part.detach())
                    return torch.tensor(total, dtype=torch.float64)

                count = _minimise(delta, objective_and_grad, args)
                grad_norms[m, j] = max(float(d.grad.abs().max()) for d in delta)
                iterations[m, j] = count
                with torch.no_grad():
                    f_values.append(query_log_probs(_Bound(model, {n: base[n] + eps * d for n, d in zip(names, delta)}),
                                                    task, queries))
                bar.update(1)
            if args.central:
                influence[:, m] = (f_values[0] - f_values[1]) / (2 * args.epsilon)
            else:
                influence[:, m] = (f_values[0] - f_base) / args.epsilon
        bar.close()
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in base:
                    p.copy_(base[n])
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    check_finite(influence, "PBRF influence")
    return PBRFResult(influence, grad_norms, iterations, time.perf_counter() - start)


class _Bound(nn.Module):
    """A view of `model` with some parameters replaced (torch.func.functional_call), usable wherever a model is."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]):
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_params", params)

    def forward(self, *args, **kwargs):
        return functional_call(self._model, self._params, args, kwargs, strict=False)

    def parameters(self, recurse: bool = True):
        return self._model.parameters(recurse)

    @property
    def config(self):
        return getattr(self._model, "config", None)


def _minimise(delta: list[torch.Tensor], objective_and_grad, args: PBRFArguments) -> int:
    """Minimise J(delta) in place; returns the number of objective evaluations."""
    count = 0

    def closure():
        nonlocal count
        count += 1
        return objective_and_grad()

    if args.optimizer == "lbfgs":
        optimizer = torch.optim.LBFGS(delta, lr=1.0, max_iter=args.max_iterations, max_eval=2 * args.max_iterations,
                                      tolerance_grad=args.gradient_tolerance, tolerance_change=1e-30,
                                      history_size=args.history_size, line_search_fn="strong_wolfe")
        optimizer.step(closure)
        closure()  # leave the gradient of the final point in .grad
    else:
        optimizer = torch.optim.Adam(delta, lr=args.learning_rate)
        for _ in range(args.max_iterations):
            closure()
            if max(float(d.grad.abs().max()) for d in delta) < args.gradient_tolerance:
                break
            optimizer.step()
        closure()
    return count
