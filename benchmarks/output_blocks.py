"""The accuracy cost of output blocks: EK-FAC with the gradient covariance S block-diagonal over k blocks of output
rows (FactorArguments.output_blocks = k, the paper's block-diagonal option for its largest model) against the
whole S, on two tiny models built from configs (GPT-NeoX and Llama), briefly trained on a Markov-chain corpus.

    python -m benchmarks.output_blocks     # writes figures/bench/output_blocks.md and .csv

Per model and k: Pearson correlation of all (query, sequence) scores against the unsplit fit; per-query top-100
overlap (share of the unsplit fit's 100 most influential sequences among the blocked fit's 100), mean and min over
queries; the bytes of Q_S (d_out^2 / k per layer) against the whole. k = 1 is the unsplit fit in another layout
(a check: Pearson 1, overlap 1). Float64 throughout, so the differences are the approximation, not rounding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from benchmarks.precision import pearson, top_k_overlap
from influence_core import (CausalLMTask, FactorArguments, ScoreArguments, compute_scores, fit_factors,
                            iterate_batches, query_gradients, track_layers)

FIGURES = Path("figures/bench")
VOCAB, LENGTH, PROMPT = 64, 24, 8
BLOCKS = (1, 2, 4, 8)
TOP_K = 100


def markov_corpus(num: int, seed: int, vocab: int = VOCAB, length: int = LENGTH,
                  successors: int = 4) -> dict[str, torch.Tensor]:
    """Sequences from a sparse random Markov chain over `vocab` tokens (each token has `successors` likely
    successors): (num, length) input_ids, labels = input_ids, no padding. The chain is the same for every corpus."""
    g = torch.Generator().manual_seed(0)
    logits = torch.full((vocab, vocab), -4.0)
    logits.scatter_(1, torch.randint(0, vocab, (vocab, successors), generator=g), 2.0)
    probs = logits.softmax(-1)
    g.manual_seed(seed)
    ids = torch.empty(num, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (num,), generator=g)
    for t in range(1, length):
        ids[:, t] = torch.multinomial(probs[ids[:, t - 1]], 1, generator=g).squeeze(1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def tiny_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=128, max_position_embeddings=64))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64))
    return {"gpt_neox (h 32, mlp 128)": neox.double(), "llama (h 32, mlp 64)": llama.double()}


def train(model: torch.nn.Module, data: dict[str, torch.Tensor], steps: int) -> None:
    """A few Adam steps of next-token prediction, so the curvature is a trained model's, not an initialisation's."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        rows = torch.randint(0, len(data["input_ids"]), (32,), generator=g)
        loss = model(input_ids=data["input_ids"][rows], labels=data["labels"][rows]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def scores_for(model, layers, train_data, queries, blocks: int | None) -> torch.Tensor:
    task = CausalLMTask()
    args = FactorArguments(dtype="float64", progress=False, output_blocks=blocks)
    factors = fit_factors(model, layers, task, iterate_batches(train_data, 32), args)
    q = query_gradients(model, layers, task, iterate_batches(queries, 16), progress=False, factors=factors)
    return compute_scores(model, layers, task, iterate_batches(train_data, 32), q,
                          args=ScoreArguments(progress=False)).total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=512, help="training (and fitting) sequences")
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200, help="training steps before fitting")
    parser.add_argument("--out", type=Path, default=FIGURES / "output_blocks.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    train_data = markov_corpus(args.train, seed=1)
    queries = markov_corpus(args.queries, seed=2)
    queries["labels"][:, :PROMPT] = -100  # the prompt is not measured
    rows = []
    for name, model in tiny_models().items():
        train(model, train_data, args.steps)
        layers = track_layers(model)
        whole = scores_for(model, layers, train_data, queries, None)
        whole_bytes = sum(l.out_features ** 2 for l in layers) * 8
        for k in BLOCKS:
            blocked = scores_for(model, layers, train_data, queries, k)
            overlap = top_k_overlap(whole, blocked, TOP_K)
            rows.append({"model": name, "tracked layers": len(layers), "output_blocks": k,
                         "pearson": pearson(whole, blocked), f"top-{TOP_K} overlap (mean)": float(overlap.mean()),
                         f"top-{TOP_K} overlap (min)": float(overlap.min()),
                         "Q_S bytes / whole": sum(l.out_features ** 2 // k for l in layers) * 8 / whole_bytes})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out.with_suffix(".csv"), index=False)
    command = "python -m benchmarks.output_blocks " + " ".join(sys.argv[1:] if argv is None else argv)
    note = (f"\n\n{args.train} training sequences of {LENGTH} tokens (also the fitting data), {args.queries} queries "
            f"(prompt {PROMPT} tokens), {args.steps} training steps; EK-FAC, float64, damping 0.1 x mean eigenvalue. "
            "Reference: the unsplit fit (whole S). k = 1 is the unsplit fit stored as one block.\n")
    args.out.write_text(f"# Output blocks: accuracy against the whole gradient covariance\n\n`{command.strip()}`\n\n"
                        + table.round(6).to_markdown(index=False) + note)


if __name__ == "__main__":
    main()
