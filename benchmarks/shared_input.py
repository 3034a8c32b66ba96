"""Input-sharing blocks against exact influence: EK-FAC with a SwiGLU MLP's gate_proj and up_proj as two layers
(the paper's per-layer blocks) or as one input-sharing block [W_gate; W_up] (influence_core.tracking.share_inputs:
one activation covariance, one joint gradient covariance, the eigenvalue correction in their joint basis), each
against the exact damped Gauss-Newton influence on tiny Llama-architecture models briefly trained on a
Markov-chain corpus.

    python -m benchmarks.shared_input      # writes figures/bench/shared_input.md and .csv

Exact: I = q^T (G + diag(lambda))^{-1} g (compute_scores' sign convention) over all tracked parameters (dense G,
float64, on the fitting data), with lambda_l = 0.1 x the mean eigenvalue of layer l's diagonal block of G for every layer of the separate
selection (so one ground truth serves both variants), and `exact, layer blocks only`: the same with G cut to
its per-layer blocks, the best any per-layer approximation can do. Reported per model seed: Pearson over all
(query, sequence) pairs, and the mean per-query top-10 overlap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks import output_blocks
from benchmarks.output_blocks import train
from benchmarks.precision import pearson, top_k_overlap
from influence_core import (CausalLMTask, FactorArguments, ScoreArguments, compute_scores, fit_factors,
                            iterate_batches, query_gradients, track_layers)
from influence_core.reference.baselines import exact_gauss_newton, parameter_gradients
from influence_core.tracking import share_inputs

FIGURES = Path("figures/bench")
VOCAB, LENGTH, PROMPT, TOP_K = 32, 12, 4, 10
GATE_UP = [["gate_proj", "up_proj"]]


def markov_corpus(num: int, seed: int) -> dict[str, torch.Tensor]:
    """Sequences of a sparse random Markov chain over VOCAB tokens (3 likely successors per token)."""
    return output_blocks.markov_corpus(num, seed, VOCAB, LENGTH, successors=3)


def llama(seed: int, hidden: int, intermediate: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, intermediate_size=intermediate,
                                        max_position_embeddings=32)).double()


def ekfac_scores(model, layers, fit, scored, queries) -> torch.Tensor:
    task = CausalLMTask()
    factors = fit_factors(model, layers, task, iterate_batches(fit, 16), FactorArguments(dtype="float64",
                                                                                          progress=False))
    q = query_gradients(model, layers, task, iterate_batches(queries, 8), progress=False, factors=factors)
    return compute_scores(model, layers, task, iterate_batches(scored, 16), q, args=ScoreArguments(progress=False)).total


def exact_scores(model, layers, fit, scored, queries) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact, exact with G cut to its per-layer blocks), both with per-layer damping 0.1 x mean eigenvalue."""
    task = CausalLMTask()
    gnh = exact_gauss_newton(model, layers, task, iterate_batches(fit, 16))
    damping, blocks, start = torch.empty(gnh.shape[0], dtype=torch.float64), torch.zeros_like(gnh), 0
    for layer in layers:
        end = start + layer.num_parameters
        damping[start:end] = 0.1 * torch.diagonal(gnh[start:end, start:end]).mean()
        blocks[start:end, start:end] = gnh[start:end, start:end]
        start = end
    q = parameter_gradients(model, layers, task, iterate_batches(queries, 8), loss="query")
    g = parameter_gradients(model, layers, task, iterate_batches(scored, 16)).double()
    return tuple(torch.linalg.solve(h + torch.diag(damping), q.double().T).T @ g.T for h in (gnh, blocks))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fit", type=int, default=64, help="fitting sequences (also the exact G's data)")
    parser.add_argument("--scored", type=int, default=64)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--shapes", default="16x32,16x64", help="hidden x intermediate sizes, comma-separated")
    parser.add_argument("--out", type=Path, default=FIGURES / "shared_input.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fit, scored = markov_corpus(args.fit, seed=1), markov_corpus(args.scored, seed=3)
    queries = markov_corpus(args.queries, seed=2)
    queries["labels"][:, :PROMPT] = -100
    rows = []
    for shape in args.shapes.split(","):
        hidden, intermediate = (int(v) for v in shape.split("x"))
        for seed in range(args.seeds):
            model = llama(seed, hidden, intermediate)
            train(model, fit, args.steps)
            separate = track_layers(model)
            exact, layer_blocks = exact_scores(model, separate, fit, scored, queries)
            variants = {"exact, layer blocks only": layer_blocks,
                        "EK-FAC, separate layers": ekfac_scores(model, separate, fit, scored, queries),
                        "EK-FAC, gate+up block": ekfac_scores(model, share_inputs(separate, GATE_UP), fit, scored,
                                                              queries)}
            for method, values in variants.items():
                rows.append({"model": f"llama h{hidden} mlp{intermediate}", "seed": seed, "method": method,
                             "pearson_with_exact": pearson(exact, values),
                             f"top{TOP_K}_overlap": float(top_k_overlap(exact, values, TOP_K).mean())})
                print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    summary = table.groupby(["model", "method"], sort=False)[["pearson_with_exact", f"top{TOP_K}_overlap"]].agg(
        ["mean", "min", "max"]).round(4)
    summary.columns = [" ".join(c) for c in summary.columns]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out.with_suffix(".csv"), index=False)
    command = "python -m benchmarks.shared_input " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.write_text(
        f"# Input-sharing blocks against exact influence (tiny Llamas)\n\n`{command.strip()}`\n\n"
        + summary.reset_index().to_markdown(index=False)
        + f"\n\nPer seed: {args.out.with_suffix('.csv').name}. {args.seeds} seeds per shape, {args.fit} fitting "
        f"sequences of {LENGTH} tokens ({VOCAB}-token Markov chain), {args.scored} scored, {args.queries} queries "
        f"(prompt {PROMPT} tokens), {args.steps} Adam steps; MLP layers tracked (gate, up, down of both blocks); "
        "float64; EK-FAC damping 0.1 x mean eigenvalue per layer (per block for the gate+up block).\n")


if __name__ == "__main__":
    main()
