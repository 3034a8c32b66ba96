"""Validation setups: one model with its curvature data, the training points to score and the queries.

- digits_mlp_setup: scikit-learn's bundled 8x8 digits (no download), an MLP trained full-batch, float64;
  f = log p(label | test point).
- language_model_setup: the micro zoo or a zoo GPT-NeoX on a random subset of its training sequences,
  f = log p(completion | prompt) of queries from its world (optionally of one query study, e.g. the fact queries).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from influence_core import CausalLMTask, Task


class ClassificationTask(Task):
    """A classifier as a one-position sequence model: logits (B, 1, C), labels (B, 1)."""

    def forward(self, model, batch):
        return model(batch["x"]).unsqueeze(1), batch["y"].unsqueeze(1)


@dataclass
class ValidationSetup:
    """One model with its curvature data, the training points to score and the measurements (queries)."""

    name: str
    model: nn.Module
    task: Task
    patterns: list[str]
    data: dict[str, torch.Tensor]  # curvature / Bregman data: row-aligned tensors (N, ...)
    scored: dict[str, torch.Tensor]  # the training points whose influence is estimated (M, ...), a subset of data
    queries: dict[str, torch.Tensor]  # test points / queries (Q, ...)
    query_names: list[str]
    fisher: str = "sampled"
    batch_size: int = 64
    lissa_depth_multiple: float | None = None  # LiSSA run to this x N (None: cfg.lissa.depth_multiple)
    gauss_newton: str = "per_class"  # how a dense G is formed (ground_truth.GAUSS_NEWTON): per_class | position_local
    pbrf: bool = True  # also the PBRF ground truth (two L-BFGS solves per scored point: small setups only)


def digits_mlp_setup(cfg: DictConfig, name: str = "digits_mlp") -> ValidationSetup:
    """scikit-learn's bundled 8x8 digits (no download), a 64-h-h-10 MLP trained full-batch with Adam, float64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.25, random_state=cfg.seed, stratify=digits.target)
    if cfg.num_train:
        train_idx = train_idx[: cfg.num_train]
    torch.manual_seed(cfg.seed)
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[cfg.activation]
    widths = [64] + [cfg.hidden] * cfg.layers
    modules: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        modules += [nn.Linear(a, b), act()]
    model = nn.Sequential(*modules, nn.Linear(widths[-1], 10)).double()
    xt, yt = x[train_idx], y[train_idx]
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    for _ in range(cfg.epochs):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        test_acc = float((model(x[test_idx]).argmax(-1) == y[test_idx]).double().mean())
    with torch.no_grad():
        train_loss = float(nn.functional.cross_entropy(model(xt), yt))
    print(f"{name}: {len(train_idx)} training points, mean training loss {train_loss:.2g}, test accuracy {test_acc:.3f}")
    generator = np.random.default_rng(cfg.seed)
    scored = generator.choice(len(train_idx), size=min(cfg.num_scored, len(train_idx)), replace=False)
    tests = generator.choice(len(test_idx), size=cfg.num_test, replace=False)
    queries = {"x": x[test_idx][tests], "y": y[test_idx][tests]}
    return ValidationSetup(name, model, ClassificationTask(), list(cfg.module_patterns), {"x": xt, "y": yt},
                           {"x": xt[scored], "y": yt[scored]}, queries, [f"test_{int(test_idx[t])}" for t in tests],
                           fisher=cfg.fisher, batch_size=cfg.batch_size)


def language_model_setup(name: str, cfg: DictConfig, artifacts: Path) -> ValidationSetup | None:
    """A GPT-NeoX of the zoo on a random subset of its training sequences (truncated), queries from its world."""
    from experiments.loading import load_model_and_tokenizer, load_text_dataset, tokenize_sequences
    from experiments.pipeline import training_batches
    from influence_core import Query, encode_queries

    if name == "micro_lm":
        from experiments.zoo.micro import build_micro_zoo

        zoo = build_micro_zoo(artifacts / "micro_zoo")
        model_path, dataset_path, world_queries = zoo.model_path, zoo.dataset_path, zoo.queries
    else:
        from experiments.zoo.queries import load_queries

        model_path, dataset_path = Path(cfg.model_path), Path(cfg.dataset_path)
        if not (model_path.exists() and dataset_path.exists() and Path(cfg.queries_path).exists()):
            print(f"{name}: {model_path} or {dataset_path} missing (build it with `make zoo`); skipped")
            return None
        world_queries = load_queries(Path(cfg.queries_path))
    model, tokenizer = load_model_and_tokenizer(model_path)
    model = model.double().eval()
    texts = load_text_dataset(dataset_path)
    generator = np.random.default_rng(cfg.seed)
    rows = generator.choice(len(texts), size=min(cfg.num_data, len(texts)), replace=False)
    encoded = tokenize_sequences(texts.select(sorted(rows.tolist())), tokenizer, max_length=cfg.max_length, truncation=True)
    encoded.pop("lengths")
    data = training_batches(encoded, len(rows))[0]
    scored_rows = generator.choice(len(rows), size=min(cfg.num_scored, len(rows)), replace=False)
    scored = {k: v[scored_rows] for k, v in data.items()}
    by_name = {q.name: q for q in world_queries}
    study = cfg.get("query_study")
    candidates = [q.name for q in world_queries if study is None or q.study == study]
    if not candidates:
        raise KeyError(f"no query of study '{study}' in the {name} world (studies: {sorted({q.study for q in world_queries})})")
    names = list(cfg.query_names) if cfg.query_names else candidates[: cfg.num_queries]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise KeyError(f"queries {unknown} are not in the {name} world (e.g. {list(by_name)[:4]})")
    queries = encode_queries(tokenizer, [Query(n, by_name[n].prompt, by_name[n].completion) for n in names])
    return ValidationSetup(name, model, CausalLMTask(), list(cfg.module_patterns), data, scored, queries, names,
                           fisher="sampled", batch_size=cfg.batch_size,
                           lissa_depth_multiple=cfg.get("lissa_depth_multiple"),
                           gauss_newton=cfg.get("gauss_newton", "per_class"), pbrf=bool(cfg.get("pbrf", True)))

