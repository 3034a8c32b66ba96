"""Half precision against float32 on the CPU: the same EK-FAC run (fit, preconditioned queries, scores) on a model
loaded in bfloat16 or float16 and in float32, and how far apart the results are.

    python -m benchmarks.precision        # micro-zoo GPT-NeoX and plain-testbed Llama; writes figures/bench/precision_cpu.md

The half-precision model runs its forward and backward in its dtype; the engine upcasts the captured activations
and output gradients and accumulates covariances, eigenvalue corrections, preconditioned queries and scores in
float32 (eigendecompositions in float64). Two references per half dtype:
- "weights rounded": the float32 model itself, so the difference includes rounding the weights to 8 (bf16) or 11
  (fp16) bits, what a user gets by loading a checkpoint in bf16 instead of fp32;
- "same weights": the half-precision weights upcast to float32, so the difference is the half-precision
  arithmetic of the forward and backward alone.
Metrics: Pearson correlation of all (query, sequence) scores; per-query top-10 overlap (share of the reference's
10 most influential sequences among the half run's 10), mean and min over queries; relative Frobenius error of the
activation and gradient covariances and of the preconditioned queries, largest over tracked layers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from influence_core import (CausalLMTask, FactorArguments, ScoreArguments, Task, compute_scores, fit_factors,
                            iterate_batches, query_gradients, track_layers)
from influence_core.factors.stages import read_tensors

FIGURES = Path("figures/bench")
TOP_K = 10


# ---- metrics (pure functions) --------------------------------------------------------------------------------------

def pearson(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Pearson correlation of two equally shaped score tables, over all their entries."""
    pair = torch.stack([reference.flatten().double(), other.flatten().double()])
    return float(torch.corrcoef(pair)[0, 1])


def top_k_overlap(reference: torch.Tensor, other: torch.Tensor, k: int = TOP_K) -> torch.Tensor:
    """Per row (query): the share of the reference's k highest-scoring columns among the other's k highest. (Q,)"""
    k = min(k, reference.shape[1])
    ref, oth = reference.topk(k, dim=1).indices, other.topk(k, dim=1).indices
    return torch.tensor([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ref, oth)], dtype=torch.float64)


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """||other - reference||_F / ||reference||_F, in float64."""
    reference, other = reference.double(), other.double()
    return float((other - reference).norm() / reference.norm())


# ---- one engine run ------------------------------------------------------------------------------------------------

@dataclass
class EngineRun:
    """What one EK-FAC run produced: scores (Q, N), covariances and preconditioned queries per layer."""

    scores: torch.Tensor
    covariances: dict[str, torch.Tensor]  # "<layer>.activation_covariance", "<layer>.gradient_covariance"
    preconditioned: dict[str, torch.Tensor]  # layer -> (Q, d_out, d_in)
    seconds: float


def run_engine(model: torch.nn.Module, train: dict, queries: dict, directory: str | Path, task: Task | None = None,
               patterns=("*mlp*",), batch_size: int = 16) -> EngineRun:
    """Fit EK-FAC factors on `train` (saved in `directory`, for the covariances), precondition `queries`, score
    every training row: the engine's defaults (float32 accumulation, damping 0.1 x mean eigenvalue, full rank)."""
    task = task or CausalLMTask()
    layers = track_layers(model, list(patterns))
    start = time.perf_counter()
    factors = fit_factors(model, layers, task, iterate_batches(train, batch_size), FactorArguments(progress=False),
                          output_dir=directory)
    preconditioned = query_gradients(model, layers, task, iterate_batches(queries, batch_size), progress=False,
                                     factors=factors)
    scores = compute_scores(model, layers, task, iterate_batches(train, batch_size), preconditioned,
                            args=ScoreArguments(progress=False)).total
    seconds = time.perf_counter() - start
    covariances = {k: v for k, v in read_tensors(Path(directory) / "covariance.safetensors").items()
                   if k.endswith("_covariance")}
    return EngineRun(scores.double(), covariances, dict(preconditioned), seconds)


def compare(reference: EngineRun, other: EngineRun, k: int = TOP_K) -> dict:
    """The agreement of `other` with `reference` (metrics of the module docstring)."""
    overlap = top_k_overlap(reference.scores, other.scores, k)
    kinds = {"activation": "activation_covariance", "gradient": "gradient_covariance"}
    row = {"pearson": pearson(reference.scores, other.scores), f"top{k}_mean": float(overlap.mean()),
           f"top{k}_min": float(overlap.min())}
    for short, suffix in kinds.items():
        row[f"{short}_cov_rel_err"] = max(relative_error(v, other.covariances[n])
                                          for n, v in reference.covariances.items() if n.endswith(suffix))
    row["ihvp_rel_err"] = max(relative_error(v, other.preconditioned[n]) for n, v in reference.preconditioned.items())
    return row


# ---- the benchmark -------------------------------------------------------------------------------------------------

def encode(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    from experiments.loading import tokenize_sequences

    encoded = tokenize_sequences(list(texts), tokenizer, max_length=max_length, truncation=True)
    encoded.pop("lengths")
    encoded["labels"] = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    return encoded


def workloads(root: Path, num_train: int, num_queries: int, max_length: int):
    """(name, model path, training rows, query rows) for a micro-zoo GPT-NeoX and a plain-testbed Llama."""
    import json

    from experiments.loading import load_model_and_tokenizer, load_text_dataset
    from experiments.plain import PlainSettings, build_plain
    from experiments.zoo.micro import build_micro_zoo
    from influence_core import Query, encode_queries

    zoo = build_micro_zoo(root / "micro_zoo")
    _, tokenizer = load_model_and_tokenizer(zoo.model_path)
    texts = list(load_text_dataset(zoo.dataset_path, split="train")["text"])[:num_train]
    queries = [Query(q.name, q.prompt, q.completion) for q in zoo.queries[:num_queries]]
    yield ("micro-zoo GPT-NeoX", zoo.model_path, encode(tokenizer, texts, max_length),
           encode_queries(tokenizer, queries))
    llama = build_plain(root / "plain", PlainSettings(), architectures=("llama",))["llama"]
    _, tokenizer = load_model_and_tokenizer(llama)
    texts = [json.loads(line)["text"] for line in (root / "plain" / "corpus.jsonl").read_text().splitlines()][:num_train]
    queries = [Query(q["name"], q["prompt"], q["completion"]) for q in
               (json.loads(line) for line in (root / "plain" / "queries.jsonl").read_text().splitlines())][:num_queries]
    yield "plain Llama", llama, encode(tokenizer, texts, max_length), encode_queries(tokenizer, queries)


def describe_model(model: torch.nn.Module) -> str:
    config = model.config
    return (f"{type(model).__name__}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, MLP "
            f"{config.intermediate_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")


def main(argv=None) -> None:
    from experiments.loading import load_model_and_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("artifacts/precision"), help="where the models are built")
    parser.add_argument("--train", type=int, default=128, help="training sequences (fitted on and scored)")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", type=Path, default=FIGURES / "precision_cpu.md")
    args = parser.parse_args(argv)
    rows, models = [], []
    for name, path, train, queries in workloads(args.root, args.train, args.queries, args.max_length):
        with tempfile.TemporaryDirectory() as scratch:
            fp32 = run_engine(load_model_and_tokenizer(path, dtype="float32")[0], train, queries, f"{scratch}/fp32")
            models.append(f"{name}: {describe_model(load_model_and_tokenizer(path)[0])}, "
                          f"{len(queries['input_ids'])} queries")
            for dtype in ("bfloat16", "float16"):
                half_model = load_model_and_tokenizer(path, dtype=dtype)[0]
                half = run_engine(half_model, train, queries, f"{scratch}/{dtype}")
                same = run_engine(half_model.float(), train, queries, f"{scratch}/{dtype}-upcast")
                for reference_name, reference in (("fp32, weights rounded", fp32), ("fp32, same weights", same)):
                    rows.append({"model": name, "dtype": dtype, "reference": reference_name,
                                 **compare(reference, half), "seconds": round(half.seconds, 1),
                                 "fp32_seconds": round(reference.seconds, 1)})
                print(pd.DataFrame(rows[-2:]).round(6).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    command = "python -m benchmarks.precision " + " ".join(argv if argv is not None else sys.argv[1:])
    note = (f"\n\nCommand: `{command.strip()}` (torch {torch.__version__}, {torch.get_num_threads()} threads, load "
            f"average {os.getloadavg()[0]:.1f} at the end; seconds are wall time of fit + queries + scores and depend "
            f"on that load). {args.train} training sequences (max {args.max_length} tokens) fitted on and scored, "
            f"up to {args.queries} queries, batch 16, EK-FAC defaults (float32 accumulation, damping 0.1 x mean eigenvalue, "
            f"full-rank queries), MLP layers tracked. Models: " + "; ".join(models) + ".\n\n"
            "Reference 'fp32, weights rounded': the float32 checkpoint (the difference includes rounding the weights "
            "to the half dtype). 'fp32, same weights': the half-precision weights upcast to float32 (the difference is "
            "the half-precision forward and backward alone). pearson: over all (query, sequence) scores; top10: share "
            "of the reference's 10 most influential sequences among the half run's 10, mean/min over queries; *_rel_err: "
            "relative Frobenius error, largest over tracked layers, of the activation / gradient covariances and of "
            "the preconditioned query gradients (the IHVP). Test with the tolerances: tests/test_precision.py.\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# Half precision against float32 on CPU\n\n" + table.round(6).to_markdown(index=False) + note)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
