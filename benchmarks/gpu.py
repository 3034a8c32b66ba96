"""The benchmark tables on a GPU, with nothing to prepare: `make bench-gpu` or `python -m benchmarks.gpu`.

On a machine with CUDA: the real-shape workload (benchmarks/real_shape.py: a GPT-NeoX at Pythia's dimensions,
random weights) in float32 and bfloat16, fixed and per-sequence costs apart, as ratios to one plain
forward+backward pass on the same GPU (wall time, synchronised) -> figures/bench/gpu_<shape>.{csv,json}.
Without one it exits at once with a one-line message (status 1), so a CPU machine runs nothing by mistake.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks import real_shape


def no_gpu_message() -> str | None:
    """The one line to exit with when there is no CUDA device, else None."""
    if torch.cuda.is_available():
        return None
    build = torch.version.cuda or "a CPU-only build"
    return (f"benchmarks.gpu: no CUDA device here (torch {torch.__version__}, {build}); nothing run. "
            "The CPU tables: make bench")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="pythia-410m", choices=list(real_shape.SHAPES))
    parser.add_argument("--sequences", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    message = no_gpu_message()
    if message is not None:
        print(message, file=sys.stderr)
        raise SystemExit(1)
    name = f"gpu_{args.shape}"
    real_shape.main(["--shape", args.shape, "--sequences", *map(str, args.sequences), "--tokens", str(args.tokens),
                     "--queries", str(args.queries), "--batch-size", str(args.batch_size), "--device", "cuda",
                     "--dtype", "float32", "bfloat16", "--name", name])


if __name__ == "__main__":
    main()
