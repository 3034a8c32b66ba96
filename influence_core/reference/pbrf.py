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

L is the summed cross-entropy of `task.forward` (the Task default). Both the Bregman term and L(z_m, theta) -
L(z_m, theta_s) are computed from the logit difference h - h_s, so J keeps ~15 digits when eps is small.

grad J(0) = grad L(z_m) and the Hessian of J at delta = 0 is G + lambda, so with damping small the problem is as
ill-conditioned as the damped GNH (condition numbers 1e4 and more). An optional preconditioner C (a symmetric
square root of an approximate (G + lambda)^{-1}, e.g. from EK-FAC) changes variables, delta = C u, and the optimiser
runs on u: same objective, same minimiser, better conditioned; L-BFGS starts with unit steps u -= grad_u J, the
Newton steps of J's quadratic model at theta_s when C C = (G + lambda)^{-1}, each kept only if it lowers J. Convergence is always judged on the gradient g of J
itself in delta: ||g||_inf <= gradient_tolerance x ||grad J(0)||_inf, or, given each query's sensitivity
w_q ~ (G + lambda)^{-1} q_q, when the first-order influence error it leaves, max_q |w_q . g|, is small enough.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ..batch import Batch, check_finite, eval_mode, row_count, to_device
from ..task import IGNORE_INDEX, Task
from ..tracking import TrackedLayer, refuse_expert_views
from .gnh import flat_to_parameters, num_tracked_parameters, parameters_to_flat


@dataclass
class PBRFArguments:
    """How the PBRF is solved. L-BFGS (full batch, strong-Wolfe line search); Adam is the paper's choice for the
    810M LM. Both run on u (delta = C u) when a preconditioner C is given."""

    epsilon: float = 1e-5  # weight of the up-weighted training sequence's loss (central difference: error O(eps^2))
    optimizer: Literal["lbfgs", "adam"] = "lbfgs"
    max_iterations: int = 300  # optimiser iterations per solve (L-BFGS: and at most twice as many evaluations)
    gradient_tolerance: float = 1e-7  # converged when max |grad J(delta)| <= this x max |grad J(0)| = max |grad L(z_m)|
    influence_tolerance: float = 1e-3  # ... or, given error_weights w, when max_q |w_q . grad J(delta)| <= this
    check_every: int = 10  # L-BFGS iterations per chunk (stop once a chunk does not lower J); initial unit steps, at most
    learning_rate: float = 0.05  # Adam only (in units of u)
    history_size: int = 50  # L-BFGS memory
    central: bool = True  # +eps and -eps (central difference); False: forward difference with +eps only
    warm_start: bool = True  # the -eps solve starts where the +eps solve ended (the two minimisers differ by O(eps))
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epsilon <= 0:
            raise ValueError(f"epsilon must be positive, got {self.epsilon}")
        if self.optimizer not in ("lbfgs", "adam"):
            raise ValueError(f"unknown optimizer '{self.optimizer}'; choose 'lbfgs' or 'adam'")
        if self.max_iterations < 1 or self.check_every < 1:
            raise ValueError(f"max_iterations and check_every must be >= 1, got {self.max_iterations}, {self.check_every}")
        if self.gradient_tolerance <= 0 or self.influence_tolerance <= 0:
            raise ValueError(f"gradient_tolerance and influence_tolerance must be positive, got "
                             f"{self.gradient_tolerance}, {self.influence_tolerance}")


@dataclass
class PBRFResult:
    """Per training example m and sign s (+eps, then -eps when central): how each solve ended."""

    influence: torch.Tensor  # (Q, M): PBRF influence of training example m on query q
    gradient_norms: torch.Tensor  # (M, S): final max |grad J(delta)|
    relative_gradient_norms: torch.Tensor  # (M, S): final max |grad J(delta)| / max |grad J(0)|
    estimated_errors: torch.Tensor  # (M, S): max_q |w_q . grad J(delta)| (NaN without error_weights)
    converged: torch.Tensor  # (M, S) bool: relative gradient <= gradient_tolerance or estimated error <= influence_tolerance
    iterations: torch.Tensor  # (M, S): objective evaluations
    final_gradients: torch.Tensor  # (M, S, P): grad J(delta) at the end, canonical flat layout (for error estimates)
    seconds: float

    @property
    def example_converged(self) -> torch.Tensor:
        """(M,) bool: every solve of example m converged."""
        return self.converged.all(dim=1)


def _parameter_names(model: nn.Module, layers: Sequence[TrackedLayer]) -> list[str]:
    refuse_expert_views(layers, "the PBRF")
    by_module = {id(module): name for name, module in model.named_modules()}
    names = []
    for layer in layers:
        prefix = by_module[id(layer.module)]
        names.append(f"{prefix}.weight")
        if layer.has_bias:
            names.append(f"{prefix}.bias")
    return names


def _centred_difference(logits: torch.Tensor, reference_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """D = (h - h_s) - sum_c p_c (h - h_s)_c and KL(p || softmax(h)) = log1p(sum_c p_c (expm1(D_c) - D_c)) per
    position, p = softmax(h_s); logits (B, T, C). Written in the difference h - h_s: with h - h_s = O(eps) the usual
    sum p (log p - log q) loses all but ~5 digits to cancellation (and J, scaled by 1/eps^2, its line search)."""
    p = torch.softmax(reference_logits, dim=-1)
    delta = logits.double() - reference_logits
    centred = delta - (p * delta).sum(dim=-1, keepdim=True)
    return centred, torch.log1p((p * (torch.expm1(centred) - centred)).sum(dim=-1))


def _kl_to_reference(logits: torch.Tensor, labels: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """sum over valid positions of KL(softmax(h_s) || softmax(h)) (the Bregman divergence of softmax cross-entropy)."""
    _, kl = _centred_difference(logits, reference_logits)
    return torch.where(labels != IGNORE_INDEX, kl, torch.zeros_like(kl)).sum()


def _loss_change(logits: torch.Tensor, labels: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """L(h) - L(h_s) for the summed cross-entropy, from the difference: sum over valid t of KL_t - D_{t, y_t}."""
    centred, kl = _centred_difference(logits, reference_logits)
    valid = labels != IGNORE_INDEX
    picked = centred.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, kl - picked, torch.zeros_like(kl)).sum()


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
                   args: PBRFArguments | None = None,
                   preconditioner: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   error_weights: torch.Tensor | None = None) -> PBRFResult:
    """PBRF influence of each training example (each a batch of one sequence) on each query row, (Q, M).

    data: the batches that define the Bregman term (the training set the curvature refers to); damping:
    lambda, a scalar or a (P,) vector in the canonical flat layout (e.g. per-layer lambda_l). preconditioner:
    optional C, (P,) -> (P,) linear and symmetric, C C ~ (G + lambda)^{-1}; the solve runs on u with delta = C u.
    error_weights: optional (Q, P), w_q ~ (G + lambda)^{-1} q_q / s_q: a remaining gradient g moves the solution by
    ~ -(G + lambda)^{-1} g and the query's influence by ~ -q_q^T (G + lambda)^{-1} g, so |w_q . g| is the influence
    error left, in units of s_q; a solve also stops (converged) once max_q |w_q . g| <= args.influence_tolerance.
    Every solve starts from the trained weights (delta = 0). The model's weights are restored afterwards.
    """
    args = args or PBRFArguments()
    layers = list(layers)
    data = list(data)
    if not data or not examples:
        raise ValueError("pbrf_influence needs non-empty data and examples")
    size = num_tracked_parameters(layers)
    damping_params = [d.detach() for d in flat_to_parameters(
        layers, torch.as_tensor(damping, dtype=torch.float64).expand(size).clone())]
    transform = (lambda v: preconditioner(v).double()) if preconditioner is not None else (lambda v: v)
    weights = error_weights.double() if error_weights is not None else None
    if weights is not None and weights.shape[-1] != size:
        raise ValueError(f"error_weights have {weights.shape[-1]} columns, the tracked layers {size} parameters")

    def estimated_error(gradient: torch.Tensor) -> float:
        return float((weights @ gradient).abs().max()) if weights is not None else float("nan")

    def measure(gradient: torch.Tensor, initial: float) -> float:
        """<= 1: converged, by the gradient or (with error weights) by the estimated influence error."""
        by_gradient = float(gradient.abs().max()) / (args.gradient_tolerance * initial) if initial > 0 else 0.0
        return min(by_gradient, estimated_error(gradient) / args.influence_tolerance) if weights is not None \
            else by_gradient
    names = _parameter_names(model, layers)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)  # only delta is differentiated
    start = time.perf_counter()
    with eval_mode(model):
        try:
            data = [to_device(b, model) for b in data]
            with torch.no_grad():
                reference = []
                num_sequences = 0
                for batch in data:
                    logits, labels = task.forward(model, batch)
                    reference.append(logits.double())
                    num_sequences += row_count(batch)
            f_base = query_log_probs(model, task, queries)
            signs = (1.0, -1.0) if args.central else (1.0,)
            influence = torch.zeros(len(f_base), len(examples), dtype=torch.float64)
            grad_norms = torch.zeros(len(examples), len(signs), dtype=torch.float64)
            relative = torch.zeros(len(examples), len(signs), dtype=torch.float64)
            errors = torch.full((len(examples), len(signs)), float("nan"), dtype=torch.float64)
            converged = torch.zeros(len(examples), len(signs), dtype=torch.bool)
            evaluations = torch.zeros(len(examples), len(signs), dtype=torch.long)
            final_gradients = torch.zeros(len(examples), len(signs), size, dtype=torch.float64)
            bar = tqdm(total=len(examples) * len(signs), desc="PBRF solves", disable=not args.progress, leave=False)
            for m, example in enumerate(examples):
                example = to_device(example, model)
                with torch.no_grad():
                    example_logits = task.forward(model, example)[0].double()
                f_values = []
                warm = None
                for j, sign in enumerate(signs):
                    eps = sign * args.epsilon

                    def delta_parameters(delta_flat: torch.Tensor) -> dict[str, torch.Tensor]:
                        return {n: base[n] + eps * d.to(base[n].dtype)
                                for n, d in zip(names, flat_to_parameters(layers, delta_flat))}

                    def objective_and_gradient(delta_flat: torch.Tensor) -> tuple[float, torch.Tensor]:
                        """J(delta) and grad J(delta), (P,) canonical flat; one pass over the Bregman data."""
                        delta = [d.detach().clone().requires_grad_(True) for d in flat_to_parameters(layers, delta_flat)]
                        gradient = [torch.zeros_like(d) for d in delta]
                        total = 0.0

                        def params() -> dict[str, torch.Tensor]:  # a fresh graph per backward pass
                            return {n: base[n] + eps * d.to(base[n].dtype) for n, d in zip(names, delta)}

                        for batch, ref in zip(data, reference):
                            logits, labels = task.forward(_Bound(model, params()), batch)
                            part = _kl_to_reference(logits, labels, ref) / (num_sequences * eps * eps)
                            for g, d in zip(gradient, torch.autograd.grad(part, delta)):
                                g += d
                            total += float(part.detach())
                        logits, labels = task.forward(_Bound(model, params()), example)
                        part = _loss_change(logits, labels, example_logits) / eps  # (L(z_m, theta) - L(z_m, theta_s)) / eps
                        part = part + 0.5 * sum((lam * d.double() ** 2).sum() for lam, d in zip(damping_params, delta))
                        for g, d in zip(gradient, torch.autograd.grad(part, delta)):
                            g += d
                        total += float(part.detach())
                        return total, parameters_to_flat(layers, gradient).double()

                    delta_flat, gradient, initial, count, end = _minimise(objective_and_gradient, transform, size, args,
                                                                          measure, warm)
                    warm = (end, initial) if args.warm_start else None
                    grad_norms[m, j] = float(gradient.abs().max())
                    relative[m, j] = grad_norms[m, j] / initial if initial > 0 else 0.0
                    errors[m, j] = estimated_error(gradient)
                    converged[m, j] = measure(gradient, initial) <= 1
                    evaluations[m, j] = count
                    final_gradients[m, j] = gradient
                    with torch.no_grad():
                        f_values.append(query_log_probs(_Bound(model, delta_parameters(delta_flat)), task, queries))
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
    check_finite(influence, "PBRF influence")
    return PBRFResult(influence, grad_norms, relative, errors, converged, evaluations, final_gradients,
                      time.perf_counter() - start)


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


def _minimise(objective_and_gradient: Callable[[torch.Tensor], tuple[float, torch.Tensor]],
              transform: Callable[[torch.Tensor], torch.Tensor], size: int, args: PBRFArguments,
              measure: Callable[[torch.Tensor, float], float], start: tuple[torch.Tensor, float] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, float, int, torch.Tensor]:
    """Minimise J(delta) over u, delta = C u, until measure(grad J(delta), max |grad J(0)|) <= 1; from u = 0, or
    from start = (u, max |grad J(0)|) of an earlier solve.

    Returns the evaluated point with the smallest measure (near the minimum J's value is flat to ~1e-13 relative,
    below what a line search resolves, so the last point is not always the best), its gradient (P,),
    max |grad J(0)|, the number of objective evaluations and the point's u.
    """
    u = (start[0].clone() if start is not None else torch.zeros(size, dtype=torch.float64)).requires_grad_(True)
    count = 0
    last: dict = {}
    best: dict = {"initial": start[1]} if start is not None else {}

    def evaluate() -> torch.Tensor:
        """J at the current u, with u.grad = C grad J(delta) (chain rule, C symmetric); cached per point."""
        nonlocal count
        if last and torch.equal(last["u"], u.detach()):
            u.grad = last["u_gradient"].clone()
            return torch.tensor(last["value"], dtype=torch.float64)
        count += 1
        with torch.no_grad():
            delta = transform(u.detach())
        value, gradient = objective_and_gradient(delta)
        u.grad = transform(gradient)
        last.update(u=u.detach().clone(), delta=delta, gradient=gradient, u_gradient=u.grad.clone(), value=value)
        if "initial" not in best:  # grad J(0) = grad L(z_m)
            best["initial"] = float(gradient.abs().max())
        score = measure(gradient, best["initial"])
        if "score" not in best or score < best["score"]:
            best.update(score=score, delta=delta, gradient=gradient, u=last["u"])
        return torch.tensor(value, dtype=torch.float64)

    evaluate()
    # first unit steps along -grad_u = -C grad J(delta): with C C = (G + lambda)^{-1} these are Newton steps with J's
    # curvature at theta_s (torch's L-BFGS would start with a step of 1 / ||grad||_1); each kept only if it lowers J
    for _ in range(args.check_every if args.optimizer == "lbfgs" else 0):
        if best["score"] <= 1:
            break
        start = dict(last)
        with torch.no_grad():
            u -= u.grad
        if float(evaluate()) >= start["value"]:
            with torch.no_grad():
                u.copy_(start["u"])
            last.update(start)
            u.grad = start["u_gradient"].clone()
            break
    if args.optimizer == "lbfgs":
        # chunks of check_every iterations (the L-BFGS history carries over); stop when J stops going down
        optimizer = torch.optim.LBFGS([u], lr=1.0, max_iter=args.check_every, max_eval=2 * args.check_every,
                                      tolerance_grad=0.0, tolerance_change=0.0, history_size=args.history_size,
                                      line_search_fn="strong_wolfe")
        stalled = 0
        while best["score"] > 1 and optimizer.state[u].get("n_iter", 0) < args.max_iterations \
                and count < 2 * args.max_iterations and stalled < 2:
            before = float(evaluate())
            optimizer.step(evaluate)
            after = float(evaluate())
            stalled = stalled + 1 if after > before - 1e-12 * max(1.0, abs(before)) else 0
    else:
        optimizer = torch.optim.Adam([u], lr=args.learning_rate)
        for _ in range(args.max_iterations):
            if best["score"] <= 1:
                break
            evaluate()
            optimizer.step()
    return best["delta"], best["gradient"], best["initial"], count, best["u"]
