"""One layer's contraction with Q rank-r queries at a real shape (issue 19, item 2; figures/bench/README.md).

    python -m benchmarks.rank32_contraction            # Pythia-160m's MLP shapes, Q = 128, r = 32, 16 x 128 tokens

Random activations, output gradients and rank-r queries; CPU seconds per batch (1 thread) of
- `factored`: the engine's token-by-token path (compute_scores' `_factor_chunks` and `_low_rank_tokens`),
  T Q r (d_out + d_in) multiply-adds per sequence;
- `rebuilt`: each chunk of queries rebuilt dense (L_q R_q) and contracted with the batch's per-sequence gradients D,
  T P + Q r P + Q P per sequence (P = d_out d_in): fewer multiply-adds at these shapes, tried and not kept because
  it is slower (it writes and reads Q P floats per batch);
- `forming D`: the per-sequence gradients alone (what the floor's weight gradient of the layer costs).
Prints one line per shape and path, and the two paths' largest relative difference.
"""

from __future__ import annotations

import argparse
import time

import torch

from influence_core import ScoreArguments
from influence_core.lowrank import LowRankQuery
from influence_core.scores import _factor_chunks, _low_rank_tokens
from influence_core.tracking import per_sequence_gradients


def cpu_seconds(call, repeats: int) -> float:
    call()  # warm up
    start = time.process_time()
    for _ in range(repeats):
        call()
    return (time.process_time() - start) / repeats


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["3072x769", "768x3073"], help="d_out x d_in (bias included)")
    parser.add_argument("--queries", type=int, default=128)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk-bytes", type=int, default=2**26, help="rebuilt path: dense queries per chunk")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    for shape in args.shapes:
        d_out, d_in = (int(x) for x in shape.split("x"))
        g = torch.randn(args.batch, args.tokens, d_out, generator=generator)
        a = torch.randn(args.batch, args.tokens, d_in, generator=generator)
        query = LowRankQuery(torch.randn(args.queries, d_out, args.rank, generator=generator) / d_out ** 0.5,
                             torch.randn(args.queries, args.rank, d_in, generator=generator) / d_in ** 0.5)
        chunks = _factor_chunks(query, ScoreArguments().low_rank_chunk)  # as compute_scores lays them out
        step = max(1, args.chunk_bytes // (d_out * d_in * 4))

        def factored():
            return _low_rank_tokens(a, g, chunks).sum(-1)

        def rebuilt():
            flat = per_sequence_gradients(a, g).reshape(args.batch, -1).T  # (P, B)
            return torch.cat([(query.left[i : i + step] @ query.right[i : i + step]).reshape(-1, d_out * d_in) @ flat
                              for i in range(0, args.queries, step)])

        difference = float((factored() - rebuilt()).abs().max() / factored().abs().max())
        for name, call in (("factored", factored), ("rebuilt", rebuilt),
                           ("forming D", lambda: per_sequence_gradients(a, g))):
            print(f"{shape:>9s} {name:9s} {cpu_seconds(call, args.repeats):6.2f} s CPU per batch of {args.batch} x "
                  f"{args.tokens} tokens (Q = {args.queries}, r = {args.rank})", flush=True)
        print(f"{shape:>9s} largest relative difference factored vs rebuilt: {difference:.1e}", flush=True)


if __name__ == "__main__":
    main()
