"""Real retraining for the LDS and the calibration: one fixed fine-tuning recipe, cached per (job, seed), resumable,
spread over processes.

The recipe minimises the mean over the training sequences of each sequence's summed token loss,

    J(theta) = (1/|S|) sum_{z in S} L(z, theta),    L(z) = sum_t -log p(z_t | z_<t),

the objective whose up-weighting by epsilon the engine's influence describes (influence_core/scores.py: units of
log p(completion) per unit epsilon; one added copy among N sequences is epsilon = 1/N). Mini-batches of
`batch_size` sequences, Adam, `epochs` passes over S in an order drawn from the seed, each step's loss the batch's
summed sequence losses divided by the nominal batch size; the model stays in eval mode (no dropout), so the seed
moves only the data order. Added copies (the calibration) each join a random batch of every epoch, drawn from a
second generator, so the other batches stay exactly those of the run without copies and the epoch's objective is
sum_n L(z_n) + k L(z): epsilon = k / N. The measurement after training: f = log p(completion |
prompt) of every query, in nats.

Cache: one json per job under `cache_dir` ({key, seed, rows, measurements}), written atomically; a rerun skips every
job whose file exists, so an interrupted run resumes. Jobs run in `processes` joblib workers, one thread each.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from influence_core import CausalLMTask, iterate_batches


@dataclass(frozen=True)
class Recipe:
    """The fine-tuning recipe: the same for the full set, every subset and every continued training."""

    epochs: int = 3
    batch_size: int = 16
    learning_rate: float = 3e-4  # Adam
    weight_decay: float = 0.0

    def describe(self) -> str:
        return (f"Adam (lr {self.learning_rate:g}, weight decay {self.weight_decay:g}), {self.epochs} epochs, "
                f"batches of {self.batch_size} sequences, mean over sequences of the summed token loss, eval mode")


@dataclass(frozen=True)
class Job:
    """One training run: start from `start` (a saved model dir), train on `rows` of the data (repeats allowed:
    added copies), measure the queries."""

    key: str
    rows: tuple[int, ...]
    seed: int
    start: str
    copies: tuple[int, ...] = ()  # rows added on top of `rows` (repeats: several copies)


def epoch_batches(rows: Sequence[int], batch_size: int, generator: np.random.Generator,
                  copies: Sequence[int] = (), copy_generator: np.random.Generator | None = None) -> list[list[int]]:
    """One epoch's batches: `rows` in the generator's order, cut every batch_size; each of `copies` joins a batch
    drawn from copy_generator (the other batches are exactly those without copies)."""
    rows = np.asarray(rows)
    order = rows[generator.permutation(len(rows))]
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    for row in copies:
        batches[int(copy_generator.integers(len(batches)))].append(int(row))
    return batches


def fine_tune(model: torch.nn.Module, data: dict[str, torch.Tensor], rows: Sequence[int], recipe: Recipe,
              seed: int, copies: Sequence[int] = ()) -> torch.nn.Module:
    """Train `model` in place on data[rows] (+ copies) by the recipe; data: input_ids, attention_mask, labels."""
    task = CausalLMTask()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    generator, copy_generator = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    model.eval()  # no dropout: the seed moves only the data order
    for _ in range(recipe.epochs):
        for index in epoch_batches(rows, recipe.batch_size, generator, copies, copy_generator):
            batch = {k: v[torch.as_tensor(index)] for k, v in data.items()}
            # summed sequence losses / nominal batch size: every sequence (and copy) weighs 1/B in each epoch
            loss = task.training_loss(model, batch) / recipe.batch_size
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model


@torch.no_grad()
def log_probabilities(model: torch.nn.Module, queries: dict[str, torch.Tensor]) -> np.ndarray:
    """f = log p(completion | prompt) of each query (Q,), nats: minus the completion's summed cross-entropy."""
    task = CausalLMTask()
    model.eval()
    out = []
    for batch in iterate_batches(queries, 64):
        for i in range(len(batch["input_ids"])):
            out.append(-float(task.query_loss(model, {k: v[i : i + 1] for k, v in batch.items()})))
    return np.asarray(out)


def _run_jobs(jobs: Sequence[Job], data_path: str, cache_dir: str, recipe: Recipe) -> list[float]:
    """Worker: run jobs one after another (one thread), each result written to cache_dir/<key>.json."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.set_num_threads(1)
    tensors = torch.load(data_path)
    data, queries = tensors["data"], tensors["queries"]
    seconds = []
    for job in jobs:
        start = time.process_time()
        model = AutoModelForCausalLM.from_pretrained(job.start, dtype=torch.float32)
        fine_tune(model, data, job.rows, recipe, job.seed, job.copies)
        values = log_probabilities(model, queries)
        cpu = time.process_time() - start
        path = Path(cache_dir) / f"{job.key}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": job.key, "seed": job.seed, "rows": list(map(int, job.rows)),
                                   "copies": list(map(int, job.copies)),
                                   "measurements": values.tolist(), "cpu_seconds": cpu, "recipe": asdict(recipe)}))
        os.replace(tmp, path)
        seconds.append(cpu)
    return seconds


def run_jobs(jobs: Sequence[Job], data: dict[str, torch.Tensor], queries: dict[str, torch.Tensor], cache_dir: Path,
             recipe: Recipe, processes: int = 2) -> dict[str, dict]:
    """Every job's cached result ({key: json}), running the missing ones in `processes` workers (joblib, loky)."""
    from joblib import Parallel, delayed

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stamp = cache_dir / "recipe.json"
    if stamp.exists() and json.loads(stamp.read_text()) != asdict(recipe):
        raise ValueError(f"{cache_dir} holds retrains of another recipe ({stamp.read_text()}); "
                         "delete it or choose another cache directory")
    stamp.write_text(json.dumps(asdict(recipe)))
    missing = [j for j in jobs if not (cache_dir / f"{j.key}.json").exists()]
    if missing:
        data_path = cache_dir / "inputs.pt"
        torch.save({"data": data, "queries": queries}, data_path)
        chunks = [missing[i::max(1, processes)] for i in range(max(1, processes))]
        print(f"retraining: {len(missing)} of {len(jobs)} runs to do in {processes} processes "
              f"({len(jobs) - len(missing)} cached in {cache_dir})")
        start = time.perf_counter()
        if processes > 1:
            Parallel(n_jobs=processes, backend="loky")(
                delayed(_run_jobs)(chunk, str(data_path), str(cache_dir), recipe) for chunk in chunks if chunk)
        else:
            _run_jobs(missing, str(data_path), str(cache_dir), recipe)
        print(f"retraining: {len(missing)} runs in {time.perf_counter() - start:.0f} s wall")
    return {j.key: json.loads((cache_dir / f"{j.key}.json").read_text()) for j in jobs}
