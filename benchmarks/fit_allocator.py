"""The fit's CPU time, and the page faults behind its run-to-run noise: two-pass and one-pass EK-FAC fits in turn,
each after its own floor, in one process.

    python -m benchmarks.fit_allocator --model zoo
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=17179869184 \\
        python -m benchmarks.fit_allocator --model zoo        # glibc keeps freed memory for reuse

Per fit: the floor (one plain forward + backward over the same N sequences, benchmarks/peer_systems.run_floor) just
before it, the fit's stage times, its CPU time over the floor's, and the minor page faults it took (getrusage): on a
machine where a fault costs microseconds, memory the C allocator hands back and asks for again is a large share of a
pass. `--kept` chooses how the one-pass fit's token cache holds tensors: as they are (the engine's choice) or copied
into 256 MiB slabs backed by transparent huge pages (the alternative that was measured against it). Prints one line
per fit; nothing is written.
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import time
from pathlib import Path

import torch

import influence_core.factors.passes as passes
from benchmarks.peer_systems import run_floor, warm_up
from benchmarks.workloads import Workload, load_workload
from influence_core import CausalLMTask, FactorArguments, fit_factors, iterate_batches, track_layers

SLAB_BYTES, HUGE_PAGE, MADV_HUGEPAGE = 256 * 2**20, 2 * 2**20, 14


class SlabKeeper:
    """TokenCache._keep's alternative: copy each tensor into the current 256 MiB slab (a new one when it is full),
    each slab advised to transparent huge pages before its first touch."""

    def __init__(self):
        self.slab, self.used = None, 0
        self.madvise = ctypes.CDLL("libc.so.6").madvise
        self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def __call__(self, cache, t: torch.Tensor) -> torch.Tensor:
        size = t.numel() * t.element_size()
        if self.slab is None or self.used + size > SLAB_BYTES:
            self.slab, self.used = torch.empty(SLAB_BYTES, dtype=torch.uint8), 0
            start = -(-self.slab.data_ptr() // HUGE_PAGE) * HUGE_PAGE
            self.madvise(start, (self.slab.data_ptr() + SLAB_BYTES) // HUGE_PAGE * HUGE_PAGE - start, MADV_HUGEPAGE)
        view = self.slab[self.used:self.used + size].view(t.dtype).view(t.shape)
        self.used += -(-size // 64) * 64
        return view.copy_(t)


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="zoo")
    parser.add_argument("--sequences", type=int, default=1000)
    parser.add_argument("--order", nargs="+", default=["two_pass", "one_pass", "two_pass", "one_pass"],
                        choices=["two_pass", "one_pass"])
    parser.add_argument("--kept", choices=["as_is", "slabs"], default="as_is")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    loaded = load_workload(Workload(args.model, args.sequences))
    warm_up(loaded)
    layers = track_layers(loaded.model)
    batches = iterate_batches(loaded.train, loaded.workload.batch_size)
    if args.kept == "slabs":
        keeper = SlabKeeper()
        passes.TokenCache._keep = lambda self, t: keeper(self, t)
    for fit in args.order:
        floor = run_floor(loaded, [], Path("."), 0)["floor_cpu_s"]
        before, start = faults(), time.process_time()
        factors = fit_factors(loaded.model, layers, CausalLMTask(), batches, FactorArguments(
            progress=False, token_cache_bytes=16 * 2**30 if fit == "one_pass" else 0))
        cpu = time.process_time() - start
        print(f"{fit}: floor {floor:.2f} s CPU, fit {cpu:.2f} s CPU = {cpu / floor:.3f} x floor, stages "
              f"{factors.manifest['timings_s']}, minor page faults {faults() - before}", flush=True)


if __name__ == "__main__":
    main()
