"""A real-shape workload: a GPT-NeoX at Pythia's published dimensions with random weights, fixed and per-sequence
costs apart, as ratios to one plain forward+backward pass in the same process.

    python -m benchmarks.real_shape --shape pythia-160m --sequences 32 64 --tokens 128   # -> figures/bench/real_shape.*

Per sequence (a pass over the data; linear in N): the floor, the covariance pass, the eigenvalue correction pass and
the scoring pass, each divided by N. Fixed (paid once per fit or per query, whatever N): the eigendecompositions,
and per query its gradient and its preconditioning. The columns `*_per_sequence_over_floor` divide by the floor's
cost per sequence; `*_fixed_over_floor_sequence` say how many sequences' floor the fixed cost is worth. Alongside,
the fixed costs' alternatives on this workload's own factors (float32 eigensolver and rotations, one batched
preconditioning matmul), with their relative error against the float64 / per-query results.

Random tokens (vocabulary of the shape), labels = inputs; MLP linear layers tracked; EK-FAC, sampled Fisher,
damping 0.1 x mean eigenvalue; the model in `--dtype` on `--device` (benchmarks/gpu.py runs this on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pandas as pd
import torch

from influence_core import (CausalLMTask, FactorArguments, ScoreArguments, compute_scores, fit_factors, iterate_batches,
                            query_gradients, track_layers)

SHAPES = {  # published GPT-NeoX dimensions of the Pythia suite
    "pythia-70m": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048),
    "pythia-160m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "pythia-410m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


def random_model(shape: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True,
                           **SHAPES[shape])
    return GPTNeoXForCausalLM(config).to(device=device, dtype=dtype).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn):
    """(result, seconds): CPU time of this process on a CPU (other jobs share the cores), wall time on a GPU."""
    sync(device)
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    start = clock()
    out = fn()
    sync(device)
    return out, clock() - start


def rows(count: int, tokens: int, vocab: int, seed: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (count, tokens), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def queries(count: int, tokens: int, vocab: int) -> dict[str, torch.Tensor]:
    q = rows(count, tokens, vocab, 99, "cpu")
    q["labels"][:, : tokens // 2] = -100  # prompt half ignored: f = log p(completion)
    return q


def floor_pass(model, task, batches) -> None:
    for batch in batches:
        model.zero_grad(set_to_none=True)
        task.training_loss(model, {k: v.to(next(model.parameters()).device) for k, v in batch.items()}).backward()
    model.zero_grad(set_to_none=True)


def fixed_cost_alternatives(factors, layers, raw: dict, device: str) -> dict:
    """Time and accuracy of the fixed costs' cheaper forms on these factors (no engine change is measured here)."""
    out = {}
    layer = max(layers, key=lambda l: l.input_dim)  # the largest activation covariance (d_in + 1 = 3073 at 160m)
    lf = factors.layers[layer.name]
    q_a = lf.activation_eigenvectors
    covariance = (q_a.double() * torch.linspace(1e-3, 1.0, q_a.shape[0], dtype=torch.float64)) @ q_a.double().T
    for dtype in (torch.float64, torch.float32):
        (values, vectors), seconds = timed(device, lambda: torch.linalg.eigh(covariance.to(device, dtype)))
        reconstructed = (vectors.double() * values.double()) @ vectors.double().T
        out[f"eigh_{str(dtype)[6:]}_s"] = seconds
        out[f"eigh_{str(dtype)[6:]}_rel_error"] = float((reconstructed.cpu() - covariance).norm() / covariance.norm())
    damping = factors.damping_for(layer.name)
    q = raw[layer.name]  # (Q, d_out, d_in)
    exact, t64 = timed(device, lambda: LayerFactorsIn(lf, torch.float64).precondition(q.double(), damping))
    per_query = LayerFactorsIn(lf, torch.float32)
    single, t32_loop = timed(device, lambda: torch.stack([per_query.precondition(v.float(), damping) for v in q]))
    batched, t32_batch = timed(device, lambda: per_query.precondition(q.float(), damping))
    from influence_core.lowrank import compress_query

    for target in {layer.name, max(layers, key=lambda l: l.out_features).name}:  # a wide and a tall layer
        x = factors.precondition(target, raw[target])
        _, svd_s = timed(device, lambda: torch.linalg.svd(x.double(), full_matrices=False))
        _, gram_s = timed(device, lambda: compress_query(x, 32))
        kind = "wide" if x.shape[1] < x.shape[2] else "tall"
        out.update({f"rank32_{kind}_layer": target, f"rank32_{kind}_full_svd_s": svd_s,
                    f"rank32_{kind}_gram_eigh_s": gram_s})
    out.update({"precondition_layer": layer.name, "precondition_queries": q.shape[0],
                "precondition_float64_s": t64, "precondition_float32_per_query_s": t32_loop,
                "precondition_float32_batched_s": t32_batch,
                "precondition_float32_rel_error": float((batched.double() - exact).norm() / exact.norm()),
                "precondition_loop_vs_batch_max_diff": float((single - batched).abs().max())})
    return out


class LayerFactorsIn:
    """A layer's factors cast to another dtype (the engine stores them in FactorArguments.dtype)."""

    def __init__(self, lf, dtype):
        import dataclasses

        # every tensor field of the layer's factors dataclass cast, the rest kept (the factors' API of today)
        self.inner = dataclasses.replace(lf, **{f.name: getattr(lf, f.name).to(dtype) for f in dataclasses.fields(lf)
                                                if isinstance(getattr(lf, f.name), torch.Tensor)})

    def precondition(self, v, damping):
        return self.inner.precondition(v, damping)


def measure(shape: str, sequences: int, tokens: int, num_queries: int, dtype: str, device: str, batch_size: int,
            alternatives: bool) -> dict:
    torch_dtype = getattr(torch, dtype)
    model = random_model(shape, torch_dtype, device)
    task, layers = CausalLMTask(), track_layers(model)
    vocab = model.config.vocab_size
    train = rows(sequences, tokens, vocab, 0, device)
    batches = iterate_batches(train, batch_size)
    floor_pass(model, task, batches[:1])  # warm-up
    _, floor_s = timed(device, lambda: floor_pass(model, task, batches))
    factors, fit_s = timed(device, lambda: fit_factors(model, layers, task, batches, FactorArguments(progress=False)))
    wall = factors.manifest["timings_s"]  # wall seconds per stage: scaled to the fit's CPU time, in their shares
    stages = {k: fit_s * v / sum(wall.values()) for k, v in wall.items()}
    encoded = queries(num_queries, min(tokens, 64), vocab)
    raw, query_s = timed(device, lambda: query_gradients(model, layers, task, iterate_batches(encoded, 8), False))
    from influence_core import precondition_queries

    preconditioned, precondition_s = timed(device, lambda: precondition_queries(raw, factors))
    record = {"shape": shape, "dtype": dtype, "device": device, "sequences": sequences, "tokens": tokens,
              "queries": num_queries, "tracked_layers": len(layers),
              "parameters": sum(p.numel() for p in model.parameters()), "floor_s": floor_s, "fit_s": fit_s,
              **{f"{k}_stage_s": v for k, v in stages.items()}, "query_gradients_s": query_s,
              "precondition_s": precondition_s}
    from influence_core import compress_queries

    compressed, record["compress_rank32_s"] = timed(device, lambda: compress_queries(preconditioned, 32))  # SVDs
    for rank, stored in ((None, preconditioned), (32, compressed)):
        args = ScoreArguments(progress=False, query_rank=rank)
        _, score_s = timed(device, lambda: compute_scores(model, layers, task, batches, stored, None, args))
        record[f"score_rank{rank or 'full'}_s"] = score_s
    per_sequence_floor = floor_s / sequences
    passes = {k: v for k, v in stages.items() if "eigendecomposition" not in k}
    record.update({
        "fit_passes_per_sequence_over_floor": sum(passes.values()) / sequences / per_sequence_floor,
        "eigendecomposition_fixed_over_floor_sequence": sum(v for k, v in stages.items() if "eigendecomposition" in k)
        / per_sequence_floor,
        "score_full_per_sequence_over_floor": record["score_rankfull_s"] / floor_s,
        "score_rank32_per_sequence_over_floor": record["score_rank32_s"] / floor_s,
        "query_fixed_over_floor_sequence": (query_s + precondition_s) / num_queries / per_sequence_floor,
        "compress_rank32_fixed_over_floor_sequence": record["compress_rank32_s"] / num_queries / per_sequence_floor,
        "precondition_per_query_s": precondition_s / num_queries,
    })
    if alternatives:
        record.update(fixed_cost_alternatives(factors, layers, raw, device))
    return record


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="pythia-160m", choices=list(SHAPES))
    parser.add_argument("--sequences", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", nargs="+", default=["float32"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("figures/bench"))
    parser.add_argument("--name", default="real_shape")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before, start = os.getloadavg(), time.perf_counter()
    records = []
    for dtype in args.dtype:
        for i, n in enumerate(args.sequences):
            records.append(measure(args.shape, n, args.tokens, args.queries, dtype, args.device, args.batch_size,
                                   alternatives=i == 0))
            print(json.dumps(records[-1], default=str), flush=True)
    table = pd.DataFrame(records)
    meta = {"command": "python -m benchmarks.real_shape " + " ".join(argv if argv is not None else os.sys.argv[1:]),
            "threads": args.threads, "load_before": load_before, "load_after": os.getloadavg(),
            "cpu_count": os.cpu_count(), "wall_min": (time.perf_counter() - start) / 60, "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / f"{args.name}.csv", index=False)
    (args.out / f"{args.name}.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta, indent=1))
    return table


if __name__ == "__main__":
    main()
