"""One system on one workload, in its own process: fit EK-FAC factors, then score Q queries for each Q.

    python -m benchmarks.peer_systems --system ours --model zoo --sequences 1000 --queries 1 32 128 --out DIR

Every process first measures the floor, one plain forward + backward pass over the N sequences (every parameter
gradient, as in training), then runs its system (`--system floor` measures only the floor). Systems:
- `ours`: influence_core (fit_factors, query_gradients preconditioning batch by batch, compute_scores), full-rank queries.
- `kronfluence`: kronfluence's Analyzer with the same settings (below); pseudo-labels drawn by our sampler from a
  generator of its own, so independent of ours.
- `kronfluence_shared`: kronfluence fed our sampled labels (same generator per batch and pass as ours), so the
  Fisher estimates are the same draw and the scores must agree to float precision: a test of the definitions.
- `dattri`: dattri-llm's EKFACAttributor (`run_dattri`).
- `bergson`: bergson's EK-FAC pipeline, stage by stage, and its gradient index (`run_bergson`; the settings it
  cannot share are listed in benchmarks/peers.py's NOTES and the table's footnote).

Same settings for every system: tracked modules = the MLP linear layers (`track_layers` default "*mlp*"; GPT-2
Conv1D layers are swapped for the equivalent nn.Linear for kronfluence, which tracks only nn.Linear / Conv2d),
the same N sequences for fitting and scoring, batch size, float32 everywhere (no AMP; eigendecomposition in
float64 in both), true Fisher (labels sampled from the model) for the covariances and the eigenvalue correction,
damping 0.1 x mean(Lambda) per layer (kronfluence: damping_factor=None), training loss summed over tokens.

Sign: ours is I = -grad f^T (G + lambda I)^-1 grad L with f = log p(completion) (paper Eq 24-25). kronfluence's
pairwise score is grad m^T (G + lambda I)^-1 grad L for its measurement m, with no minus sign; we give it
m = log p(completion) (the paper's f) and report -score, which is then the same quantity
(tests/test_bench_peers.py checks the sign).

Timings, wall and CPU time of the process: fit = covariance + eigendecomposition + correction (each stage's wall
time also reported); score = query gradients + preconditioning + the pass over the N training sequences, per Q.
Peak memory per phase: peak RSS (VmHWM, reset before each phase through /proc/self/clear_refs) and, on a GPU,
torch.cuda.max_memory_allocated.
Writes DIR/result.json and DIR/scores_q<Q>.npy ((Q, N) float32, in our sign convention); a system with a gradient
index (ours at seed 0, bergson) also DIR/index_scores_q1.npy and the record's `index` entry (build and query times;
ours also the re-rank of the query's best rows by exact EK-FAC, DIR/rerank_rows_q1.npy).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from benchmarks.workloads import LoadedWorkload, Workload, describe, load_workload
from influence_core import (CausalLMTask, FactorArguments, ScoreArguments, compute_scores, fit_factors, iterate_batches,
                            query_gradients, track_layers)
from influence_core.factors.passes import batch_generator
from influence_core.task import IGNORE_INDEX, sample_labels

SYSTEMS = ("floor", "ours", "ours_rank32", "ours_subset", "ours_one_pass", "kronfluence", "kronfluence_shared",
           "dattri", "bergson")
QUERY_BATCH = 32  # queries per forward/backward of their gradients in every system; all Q share one training pass


# ------------------------------------------------------------------------------------------------ measurement


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process since the last reset (Linux VmHWM), in MiB."""
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        return None


def reset_peaks() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


@contextmanager
def phase(record: dict, name: str):
    """Time a phase and record its peak memory: record[name + '_s' (wall), '_cpu_s' (this process's CPU time, all
    threads), '_peak_rss_mb', and on a GPU '_peak_gpu_mb']. On a CPU shared with other jobs the CPU time of a
    one-thread process is what the phase costs; the wall time also counts the time other processes held the cores."""
    reset_peaks()
    record[f"{name}_start_rss_mb"] = peak_rss_mb()  # right after the reset: the resident size at the start
    start, start_cpu = time.perf_counter(), time.process_time()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        record[f"{name}_peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    record[f"{name}_s"] = time.perf_counter() - start
    record[f"{name}_cpu_s"] = time.process_time() - start_cpu
    record[f"{name}_peak_rss_mb"] = peak_rss_mb()


def warm_up(loaded: LoadedWorkload) -> None:
    """One untimed forward + backward, so no system pays for lazy library initialisation."""
    batch = {k: v[: loaded.workload.batch_size] for k, v in loaded.train.items()}
    params = list(loaded.model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    torch.autograd.grad(CausalLMTask().training_loss(loaded.model, batch), params)
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)


# ------------------------------------------------------------------------------------------------ systems


def run_floor(loaded: LoadedWorkload, queries: list[int], out: Path, seed: int,
              max_sequences: int | None = None) -> dict:
    """One plain forward + backward over the data: every parameter's gradient, as a training step computes it.

    With max_sequences < N, the pass runs over the first max_sequences and its times are scaled by N / max_sequences
    (every batch has the same shape, so the cost per batch is constant): it keeps the 10k-sequence cells affordable.
    """
    model, task = loaded.model, CausalLMTask()
    for p in model.parameters():
        p.requires_grad_(True)
    sequences = loaded.workload.sequences
    measured = min(sequences, max_sequences or sequences)
    record: dict = {"floor_measured_sequences": measured}
    with phase(record, "floor"):
        for batch in iterate_batches({k: v[:measured] for k, v in loaded.train.items()}, loaded.workload.batch_size):
            model.zero_grad(set_to_none=True)
            task.training_loss(model, batch).backward()
    model.zero_grad(set_to_none=True)
    for key in ("floor_s", "floor_cpu_s"):
        record[key] *= sequences / measured
    return record


def run_ours(loaded: LoadedWorkload, queries: list[int], out: Path, seed: int, query_rank: int | None = None,
             index_dim: int | None = None, covariance_fraction: float | None = None, token_cache_bytes: int = 0) -> dict:
    """Our EK-FAC: fit, then per Q the query gradients preconditioned batch by batch and one scoring pass; with
    index_dim also our gradient index on the same factors (`run_ours_index`); with covariance_fraction, A and S from
    that share of the fitting batches (FactorArguments.covariance_fraction), the eigenvalue correction from all; with
    token_cache_bytes, the one-pass fit (the correction from the per-token a, g the covariance pass kept)."""
    model, task = loaded.model, CausalLMTask()
    layers = track_layers(model)
    batches = iterate_batches(loaded.train, loaded.workload.batch_size)
    factor_dir = out / "factors"
    shutil.rmtree(factor_dir, ignore_errors=True)
    record: dict = {"tracked_layers": [l.name for l in layers], "query_rank": query_rank,
                    "covariance_fraction": covariance_fraction, "token_cache_bytes": token_cache_bytes}
    with phase(record, "fit"):
        factors = fit_factors(model, layers, task, batches, FactorArguments(
            strategy="ekfac", damping_factor=0.1, seed=seed, progress=False, covariance_fraction=covariance_fraction,
            token_cache_bytes=token_cache_bytes), output_dir=factor_dir)
    record["fit_stages_s"] = dict(factors.manifest["timings_s"])
    record["token_cache_peak_bytes"] = factors.manifest.get("token_cache_peak_bytes", 0)
    record["scores"] = []
    for count in queries:
        names, encoded = loaded.encoded_queries(count)
        entry: dict = {"queries": count}
        with phase(entry, "score"):
            # preconditioned (and at a rank truncated) batch by batch: neither the raw gradients of all Q queries nor
            # their full-rank preconditioned ones are ever held beside what is kept
            query_batches = iterate_batches(encoded, QUERY_BATCH, by_length=True)
            preconditioned = query_gradients(model, layers, task, query_batches, progress=False, factors=factors,
                                             query_rank=query_rank)
            scores = compute_scores(model, layers, task, batches, preconditioned, names,
                                    ScoreArguments(progress=False, query_rank=query_rank))
            del preconditioned
        np.save(out / f"scores_q{count}.npy", scores.total.numpy().astype(np.float32))
        record["scores"].append(entry)
    if index_dim:
        record["index"] = run_ours_index(loaded, layers, factors, index_dim, out)
    return record


# ours_subset's share of the fitting batches for A and S, chosen from the committed accuracy curve
# (figures/bench/covariance_subset.md: at 0.1, Pearson pooled over queries 0.9985 / 0.9989 and top-100 overlap 0.89 /
# 0.96 with the full fit on zoo_s / gpt2_s), before any peer table was run with it; the per-query means are lower
# (figures/bench/README.md, "Two Pearsons")
SUBSET_COVARIANCE_FRACTION = 0.1
ONE_PASS_CACHE_BYTES = 16 * 2**30  # ours_one_pass: a cap, not an allocation; what it took is token_cache_peak_bytes
OURS_INDEX_DIM = 32  # our gradient index in the peer table: eigen 32 x 32 per layer (benchmarks/index.py's default)
RERANK_CANDIDATES = 500  # the index's best rows per query rescored by exact EK-FAC (as benchmarks/index.py)


def run_ours_index(loaded: LoadedWorkload, layers, factors, index_dim: int, out: Path) -> dict:
    """Our gradient index (influence_core.index, eigen projection index_dim x index_dim per layer) on the fit's
    factors: build over the N sequences, one query (a cold one first, then the timed warm one), then that query's
    re-rank of its RERANK_CANDIDATES best rows by exact EK-FAC. Writes DIR/index_scores_q1.npy ((1, N), the index
    alone) and DIR/rerank_rows_q1.npy (the re-ranked rows, best first)."""
    from influence_core.index import GradientIndex, IndexArguments, build_index, query_index, rerank

    model, task, workload = loaded.model, CausalLMTask(), loaded.workload
    folder = out / "index"
    shutil.rmtree(folder, ignore_errors=True)
    entry: dict = {"projection_dim": index_dim, "queries": 1, "rerank_candidates": RERANK_CANDIDATES}
    arguments = IndexArguments(projection="eigen", output_dim=index_dim, input_dim=index_dim,
                               batch_size=workload.batch_size, progress=False)
    with phase(entry, "build"):
        build_index(model, layers, task, loaded.train, factors, folder, arguments)
    index = GradientIndex(folder)  # as a new process would: from disk
    entry["bytes_per_sequence"] = index.bytes_per_sequence
    _, encoded = loaded.encoded_queries(1)

    def query():
        return query_index(model, layers, task, iterate_batches(encoded, 1), factors, index)

    with phase(entry, "query_cold"):
        query()
    with phase(entry, "query"):
        scores, preconditioned = query()
    with phase(entry, "rerank"):
        rows, _ = rerank(model, layers, task, loaded.train, preconditioned, scores, RERANK_CANDIDATES,
                         workload.batch_size)
    np.save(out / "index_scores_q1.npy", scores.numpy().astype(np.float32))
    np.save(out / "rerank_rows_q1.npy", rows.numpy())
    shutil.rmtree(folder, ignore_errors=True)
    return entry


class _Rows(torch.utils.data.Dataset):
    """Rows of a dict of (N, ...) tensors, as kronfluence's DataLoader wants them."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def kronfluence_task(module_names: list[str], shared_labels: tuple[int, int] | None = None,
                     independent_seed: int = 1234567):
    """kronfluence Task for a causal LM with our definitions (summed CE training loss, f = log p(completion)).

    Pseudo-labels come from our inverse-CDF sampler (`sample_labels`), so sampling costs the two engines the same:
    by default from one generator of its own (draws independent of ours); with shared_labels = (seed, batches per
    pass) the k-th sampled batch uses the generator ours uses for batch k mod n of pass k // n (covariance pass 0,
    correction pass 1): the same draws as ours. (kronfluence's examples sample with torch.multinomial, which cost
    it ~11 s more per 1k-sequence fit on zoo_s, vocabulary 4096; figures/bench/README.md.)
    """
    from kronfluence.task import Task

    def logits_and_labels(batch, model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits[:, :-1], batch["labels"][:, 1:]

    def summed_ce(logits, labels):
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")

    class CausalLMKronfluenceTask(Task):
        sampled_batches = 0
        independent = torch.Generator().manual_seed(independent_seed)

        def compute_train_loss(self, batch, model, sample=False):
            logits, labels = logits_and_labels(batch, model)
            if sample:
                if shared_labels is None:
                    generator = self.independent
                else:
                    seed, per_pass = shared_labels
                    k = self.sampled_batches
                    generator = batch_generator(seed, k // per_pass, k % per_pass)
                    self.sampled_batches += 1
                sampled = sample_labels(logits, generator)
                labels = torch.where(labels != IGNORE_INDEX, sampled, IGNORE_INDEX)
            return summed_ce(logits, labels)

        def compute_measurement(self, batch, model):
            logits, labels = logits_and_labels(batch, model)
            return -summed_ce(logits, labels)  # f = sum of log p(completion tokens); prompt labels are ignored

        def get_influence_tracked_modules(self):
            return list(module_names)

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return CausalLMKronfluenceTask()


def conv1d_as_linear(model: torch.nn.Module) -> torch.nn.Module:
    """Replace each transformers Conv1D (y = x W + b, W (d_in, d_out)) by the same map as nn.Linear, in place."""
    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Conv1D":
            continue
        d_in, d_out = module.weight.shape
        linear = torch.nn.Linear(d_in, d_out, bias=module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(module.weight.T)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model


def run_kronfluence(loaded: LoadedWorkload, queries: list[int], out: Path, seed: int, shared: bool = False) -> dict:
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments as KronFactorArguments
    from kronfluence.arguments import ScoreArguments as KronScoreArguments

    names = [l.name for l in track_layers(loaded.model)]
    batch_size = loaded.workload.batch_size
    per_pass = -(-loaded.workload.sequences // batch_size)
    task = kronfluence_task(names, (seed, per_pass) if shared else None, independent_seed=seed + 1234567)
    model = prepare_model(conv1d_as_linear(loaded.model), task)
    root = out / "kronfluence"
    shutil.rmtree(root, ignore_errors=True)
    analyzer = Analyzer("bench", model, task, cpu=not torch.cuda.is_available(), disable_tqdm=True,
                        output_dir=str(root), log_level=logging.WARNING)
    train = _Rows(loaded.train)
    float32 = torch.float32
    factor_args = KronFactorArguments(
        strategy="ekfac", use_empirical_fisher=False, amp_dtype=None, covariance_max_examples=None,
        lambda_max_examples=None, activation_covariance_dtype=float32, gradient_covariance_dtype=float32,
        eigendecomposition_dtype=torch.float64, per_sample_gradient_dtype=float32, lambda_dtype=float32)
    score_args = KronScoreArguments(damping_factor=None, amp_dtype=None, per_sample_gradient_dtype=float32,
                                    precondition_dtype=float32, score_dtype=float32)
    record: dict = {"tracked_layers": names, "label_sampling": "ours' draws" if shared else "own generator"}
    stages = {}
    with phase(record, "fit"):
        start = time.perf_counter()
        analyzer.fit_covariance_matrices("ekfac", train, per_device_batch_size=batch_size, factor_args=factor_args,
                                         overwrite_output_dir=True)
        stages["covariance"] = time.perf_counter() - start
        start = time.perf_counter()
        analyzer.perform_eigendecomposition("ekfac", factor_args=factor_args, overwrite_output_dir=True)
        stages["eigendecomposition"] = time.perf_counter() - start
        start = time.perf_counter()
        analyzer.fit_lambda_matrices("ekfac", train, per_device_batch_size=batch_size, factor_args=factor_args,
                                     overwrite_output_dir=True)
        stages["eigenvalue_correction"] = time.perf_counter() - start
    record["fit_stages_s"] = stages
    record["scores"] = []
    for count in queries:
        _, encoded = loaded.encoded_queries(count)
        entry: dict = {"queries": count}
        with phase(entry, "score"):
            query_batch = min(count, QUERY_BATCH)  # accumulating every query batch first: one training pass
            args = dataclasses.replace(score_args, query_gradient_accumulation_steps=-(-count // query_batch))
            analyzer.compute_pairwise_scores(
                f"q{count}", "ekfac", _Rows(encoded), train, per_device_query_batch_size=query_batch,
                per_device_train_batch_size=batch_size, score_args=args, overwrite_output_dir=True)
            scores = analyzer.load_pairwise_scores(f"q{count}")
        np.save(out / f"scores_q{count}.npy", (-scores["all_modules"]).numpy().astype(np.float32))  # our sign
        record["scores"].append(entry)
    return record


def _causal_lm_losses(generator: torch.Generator):
    """(training loss, sampled-label loss, query loss) as (model, batch) -> scalar, our definitions (summed CE;
    pseudo-labels from our inverse-CDF sampler; query loss = -log p(completion), prompt labels ignored)."""
    def logits_and_labels(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits[:, :-1], batch["labels"][:, 1:]

    def summed_ce(logits, labels):
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")

    def training_loss(model, batch):
        return summed_ce(*logits_and_labels(model, batch))

    def sampled_loss(model, batch):
        logits, labels = logits_and_labels(model, batch)
        sampled = sample_labels(logits.detach(), generator)
        return summed_ce(logits, torch.where(labels != IGNORE_INDEX, sampled, IGNORE_INDEX))

    return training_loss, sampled_loss, training_loss  # the query batches carry -100 on their prompts


def run_dattri(loaded: LoadedWorkload, queries: list[int], out: Path, seed: int) -> dict:
    """dattri-llm's EKFACAttributor: the Fisher fitted from gradients of labels sampled by our sampler (its own
    generator), stored with `cache` and fitted with `fit`; scores by `attribute` with the summed training loss and
    the query loss as target, damping 0.1 x each layer's mean eigenvalue (relative_damping). Its score
    grad_test^T F^-1 grad_train with target -log p(completion) is our I (no sign flip). Rows and columns come back
    keyed by content hashes (dattri_llm.hash_sample of input_ids and attention_mask), mapped back to our order."""
    from dattri_llm import HookManagerConfig, hash_sample
    from dattri_llm.attribution import AttributionArguments, EKFACAttributor
    from dattri_llm.task import AttributionTask

    names = [l.name for l in track_layers(loaded.model)]
    model = conv1d_as_linear(loaded.model)  # its linear_io hooks take nn.Linear
    training_loss, sampled_loss, query_loss = _causal_lm_losses(torch.Generator().manual_seed(seed + 1234567))
    hook = HookManagerConfig(hook_types={n: "linear_io" for n in names})
    root = out / "dattri"
    shutil.rmtree(root, ignore_errors=True)
    batch_size = loaded.workload.batch_size
    train = _Rows(loaded.train)
    record: dict = {"tracked_layers": names, "label_sampling": "own generator"}

    def arguments(eval_batch: int) -> AttributionArguments:
        return AttributionArguments(output_dir=str(root), per_device_train_batch_size=batch_size,
                                    per_device_eval_batch_size=eval_batch, use_cpu=not torch.cuda.is_available(),
                                    seed=seed)

    def key(row):
        return hash_sample({"input_ids": row["input_ids"], "attention_mask": row["attention_mask"]})

    stages = {}
    _, first = loaded.encoded_queries(1)
    with phase(record, "fit"):
        start = time.perf_counter()
        fitter = EKFACAttributor(arguments(1), task=AttributionTask(sampled_loss, model))
        (train_dir, _), = fitter.cache(train, _Rows(first), hook_config=hook)  # the sampled-label gradients, stored
        stages["gradient_store"] = time.perf_counter() - start
        start = time.perf_counter()
        fisher_dir = fitter.fit(train_dir, str(root / "fisher"))
        stages["covariance_eigendecomposition_correction"] = time.perf_counter() - start
    shutil.rmtree(Path(train_dir).parent, ignore_errors=True)  # the stored pseudo-gradients are not needed again
    record["fit_stages_s"] = stages
    rows = {key(train[i]): i for i in range(len(train))}
    record["scores"] = []
    for count in queries:
        _, encoded = loaded.encoded_queries(count)
        query_rows = _Rows(encoded)
        entry: dict = {"queries": count}
        with phase(entry, "score"):
            attributor = EKFACAttributor(arguments(min(count, QUERY_BATCH)),
                                         task=AttributionTask(training_loss, model, target_func=query_loss))
            score = attributor.attribute(train, query_rows, hook_config=hook, damping=0.1, relative_damping=True,
                                         fisher_dir=fisher_dir)
        columns = {h: j for j, h in enumerate(score.test_ids)}
        order = [rows.get(h) for h in score.row_train_ids]
        if None in order or len(order) != len(train):
            raise RuntimeError(f"dattri returned {len(order)} rows for {len(train)} training sequences, or rows this "
                               "workload does not hold")
        matrix = np.empty((count, len(train)), dtype=np.float32)
        values = score.scores.float().numpy()
        for j in range(count):
            matrix[j, order] = values[:, columns[key(query_rows[j])]]
        np.save(out / f"scores_q{count}.npy", matrix)
        record["scores"].append(entry)
    shutil.rmtree(root, ignore_errors=True)
    return record


BERGSON_INDEX_DIM = 32  # per-layer projection of bergson's gradient index: 32 x 32 per layer, the bytes of our eigen32


def _bergson_stage(worker, config, *args) -> str:
    """Run one of bergson's stage workers in this process as rank 0 of 1 (what its launcher does on one device),
    then move the stage's `.part` folder into place, as its own wrappers do. Returns the stage's folder."""
    shutil.rmtree(config.run_path, ignore_errors=True)
    shutil.rmtree(config.partial_run_path, ignore_errors=True)
    config.partial_run_path.mkdir(parents=True)
    worker(0, 0, 1, config, *args)
    shutil.move(config.partial_run_path, config.run_path)
    return config.run_path


def _bergson_rows(tensors: dict[str, torch.Tensor]):
    """Our padded rows as the pre-tokenized datasets.Dataset bergson's workers read: input_ids and labels cut to
    each row's attention mask (the query prompts keep their IGNORE_INDEX labels), and their lengths."""
    import datasets

    lengths = tensors["attention_mask"].sum(1).tolist()
    return datasets.Dataset.from_dict({
        "input_ids": [row[:n].tolist() for row, n in zip(tensors["input_ids"], lengths)],
        "labels": [row[:n].tolist() for row, n in zip(tensors["labels"], lengths)],
        "length": lengths})


def run_bergson(loaded: LoadedWorkload, queries: list[int], out: Path, seed: int,
                index_dim: int | None = BERGSON_INDEX_DIM) -> dict:
    """bergson's EK-FAC (HessianConfig(method="kfac", ev_correction=True)), its pipeline's stages called one by one:
    fit = `hessian_worker` (covariances, eigendecomposition, eigenvalue correction); score at Q = `build_worker` on
    the Q queries (their gradients), `apply_worker` (damped inverse, 0.1 x each layer's mean corrected eigenvalue:
    InversionConfig's default, as ours), `score_worker` (one pass over the N sequences, every query's column).

    Settings: our tracked layers (every other affine layer of the base model excluded through `filter_modules`),
    bias columns (`include_bias`), summed training loss, float32, true Fisher (labels sampled by its
    torch.multinomial from the global generator, seeded here: independent of our draws), batches of the bench's
    batch size (token budget batch x seq_len, `max_batch_size` batch). bergson takes a model folder, so the model
    is written with save_pretrained before the timings, and each stage loads it (inside the timings); the data are
    handed to the workers as an in-memory datasets.Dataset of our token rows (its loader would re-tokenize text and
    caps a batch at the model's context, 256 tokens for the bench GPT-2). Its fit's fixed cost is mostly two full
    gc.collect() passes (`_release_device_memory`, ~0.35 s each in this process), which weigh at small N. Score sign: bergson's score is
    grad(query loss)^T H^-1 grad(training loss) with query loss -log p(completion), our I as it stands.

    With index_dim: bergson's gradient index, `build_worker` storing every training sequence's gradient randomly
    projected to index_dim x index_dim per layer, and a query through its `Attributor` (the query's gradient
    projected and multiplied with the stored rows). bergson applies EK-FAC only to unprojected gradients
    (EkfacApplicator refuses projection_dim with ev_correction), so its index scores are plain projected gradient
    dot products: their agreement with ours is that of an unpreconditioned index.
    """
    from bergson.build import build_worker
    from bergson.config.config import (DistributedConfig, HessianConfig, IndexConfig, InversionConfig,
                                       PreprocessConfig, ScoreConfig)
    from bergson.data import load_scores
    from bergson.hessians.apply_hessian import EkfacConfig, apply_worker
    from bergson.hessians.hessian_approximations import hessian_worker
    from bergson.score.score import score_worker
    from bergson.utils.worker_utils import setup_model_and_peft

    model, workload = loaded.model, loaded.workload
    layers = track_layers(model)
    names = [l.name for l in layers]
    prefix = model.base_model_prefix + "."
    inside = {n.removeprefix(prefix) for n in names}  # bergson names modules inside model.base_model
    if not all(n.startswith(prefix) for n in names):
        raise ValueError(f"tracked layers {names} are not all inside the base model '{model.base_model_prefix}'")
    others = [n for n, m in model.base_model.named_modules() if n not in inside
              and (isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))
                   or type(m).__name__ == "Conv1D")]
    root = out / "bergson"
    shutil.rmtree(root, ignore_errors=True)
    model.save_pretrained(root / "model")
    train = _bergson_rows(loaded.train)

    def config(stage: str, rows: int, tokens: int, **fields) -> IndexConfig:
        return IndexConfig(run_path=str(root / stage), model=str(root / "model"), precision="fp32",
                           distributed=DistributedConfig(nproc_per_node=1), include_bias=True, loss_reduction="sum",
                           filter_modules=",".join(others) or None, token_batch_size=rows * tokens,
                           max_batch_size=rows, **fields)

    batch, seq_len = workload.batch_size, workload.seq_len
    record: dict = {"tracked_layers": names, "label_sampling": "own generator (torch.multinomial)",
                    "bergson_untracked_modules": others}
    start = time.process_time()
    setup_model_and_peft(config("load", batch, seq_len))  # what each stage pays to read the model folder
    record["bergson_model_load_cpu_s"] = time.process_time() - start
    torch.manual_seed(seed + 1234567)
    with phase(record, "fit"):
        hessian = _bergson_stage(hessian_worker, config("hessian", batch, seq_len),
                                 HessianConfig(method="kfac", ev_correction=True, hessian_dtype="fp32"), train)
    record["fit_stages_s"] = {"covariance_eigendecomposition_correction": record["fit_s"]}
    record["scores"] = []
    for count in queries:
        _, encoded = loaded.encoded_queries(count)
        query_rows, width = _bergson_rows(encoded), encoded["input_ids"].shape[1]
        entry: dict = {"queries": count}
        with phase(entry, "score"):
            gradients = _bergson_stage(build_worker, config(f"query_q{count}", QUERY_BATCH, width),
                                       PreprocessConfig(), query_rows)
            preconditioned = str(root / f"preconditioned_q{count}")
            shutil.rmtree(preconditioned, ignore_errors=True)
            apply_worker(0, 0, 1, EkfacConfig(hessian_method_path=hessian, gradient_path=gradients,
                                              run_path=preconditioned, ev_correction=True,
                                              apply_batch_size=QUERY_BATCH),
                         InversionConfig(inversion="damped_inverse", damping_factor=0.1))
            scores_dir = _bergson_stage(score_worker, config(f"scores_q{count}", batch, seq_len),
                                        ScoreConfig(query_path=preconditioned, score="individual", precision="fp32"),
                                        PreprocessConfig(), train)
            scores = np.asarray(load_scores(Path(scores_dir))[:], dtype=np.float32).T  # (N, Q) -> (Q, N)
        np.save(out / f"scores_q{count}.npy", scores)
        record["scores"].append(entry)
    if index_dim:
        record["index"] = run_bergson_index(loaded, train, config, index_dim, out)
    shutil.rmtree(root, ignore_errors=True)
    return record


def run_bergson_index(loaded: LoadedWorkload, train, config, index_dim: int, out: Path) -> dict:
    """bergson's gradient index: build over the N sequences, then one query (a cold one first, as in
    benchmarks/index.py, then the timed warm one); writes DIR/index_scores_q1.npy ((1, N), all rows ranked)."""
    from bergson.build import build_worker
    from bergson.config.config import PreprocessConfig
    from bergson.query.attributor import Attributor

    model, workload = loaded.model, loaded.workload
    entry: dict = {"projection_dim": index_dim, "queries": 1}
    with phase(entry, "build"):
        index = _bergson_stage(build_worker, config("index", workload.batch_size, workload.seq_len,
                                                    projection_dim=index_dim), PreprocessConfig(), train)
    sizes = json.loads((Path(index) / "info.json").read_text())["grad_sizes"]
    entry["bytes_per_sequence"] = 4 * sum(sizes.values())  # float32 rows
    attributor = Attributor(index, device="cpu", unit_norm=False)  # the stored rows, read into memory (not timed)
    _, encoded = loaded.encoded_queries(1)
    modules = set(attributor.ordered_modules)
    for p in model.parameters():
        p.requires_grad_(True)

    def query():
        with attributor.trace(model.base_model, None, modules=modules) as result:
            CausalLMTask().query_loss(model, encoded).backward()  # -log p(completion)
        model.zero_grad(set_to_none=True)
        return result

    with phase(entry, "query_cold"):
        query()
    with phase(entry, "query"):
        result = query()
    scores = np.empty((1, attributor.N), dtype=np.float32)
    scores[0, result.indices[0].numpy()] = result.scores[0].numpy()
    np.save(out / "index_scores_q1.npy", scores)
    return entry


RUNNERS = {"floor": run_floor, "dattri": run_dattri, "bergson": run_bergson,
           "ours": lambda loaded, queries, out, seed: run_ours(loaded, queries, out, seed,
                                                              index_dim=OURS_INDEX_DIM if seed == 0 else None),
           "ours_rank32": lambda *a: run_ours(*a, query_rank=32),
           "ours_subset": lambda *a: run_ours(*a, covariance_fraction=SUBSET_COVARIANCE_FRACTION),
           "ours_one_pass": lambda *a: run_ours(*a, token_cache_bytes=ONE_PASS_CACHE_BYTES),
           "kronfluence": run_kronfluence,
           "kronfluence_shared": lambda *a: run_kronfluence(*a, shared=True)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", required=True, choices=SYSTEMS)
    parser.add_argument("--model", required=True)
    parser.add_argument("--sequences", type=int, required=True)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--queries", type=int, nargs="*", default=[])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--floor-sequences", type=int, default=2000, help="measure the floor on at most this many")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    workload = Workload(args.model, args.sequences, args.seq_len, args.batch_size)
    start = time.perf_counter()
    loaded = load_workload(workload)
    record = {"system": args.system, "workload": describe(loaded), "seed": args.seed, "threads": args.threads,
              "torch": torch.__version__, "load_s": time.perf_counter() - start, "rss_after_load_mb": peak_rss_mb()}
    if args.system.startswith("kronfluence"):
        import kronfluence

        record["kronfluence"] = kronfluence.__version__
    if args.system == "dattri":
        from importlib.metadata import version

        record["dattri_llm"] = version("dattri-llm")
    if args.system == "bergson":
        import bergson

        record["bergson"] = bergson.__version__
    warm_up(loaded)
    if args.system != "floor":  # the floor in the same process, just before: machine load shifts both alike
        record.update(run_floor(loaded, [], args.out, args.seed, args.floor_sequences))
    record.update(RUNNERS[args.system](loaded, args.queries, args.out, args.seed))
    (args.out / "result.json").write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
