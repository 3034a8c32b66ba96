"""Workloads of the peer benchmark: a model, N packed training sequences, Q queries; everything cached and seeded.

Models (all float32, eval mode, MLP linear layers tracked):

- `zoo`: the trained zoo model zoo_s, seed 0 (GPT-NeoX, nn.Linear MLP), built by `make bench-zoo` (~5 min, once) or
  `make zoo`. There is no fallback: a workload without it (or without the full world's tokenizer and queries) is
  refused, because the micro zoo's vocabulary (512 against 4,096 tokens) and queries change every cost and peak.
- `gpt2_s`, `gpt2_m`: GPT-2 architecture (transformers GPT2LMHeadModel, Conv1D MLP layers), created from a config
  with a fixed seed on the zoo tokenizer's vocabulary, briefly trained (AdamW, `GPT2_TRAIN_STEPS` steps on the
  bench sequences; influence on a random-init model is dominated by its uniform predictions), saved with
  `save_pretrained` and loaded back with `from_pretrained`. Nothing is downloaded.

Data: the zoo world's generator (`experiments/zoo/world.py`) with more documents per family (the full world has
~3.6k training documents, ~0.38M tokens; 10k sequences need more), tokenized with the zoo model's tokenizer and
packed into rows of `seq_len` tokens (no padding), so every system sees identical, fixed-shape batches.
Queries: the world's query set (prompt -> completion, f = log p(completion)), round-robin over studies.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.setup import ARTIFACTS, as_engine_queries, diverse_queries
from influence_core import encode_queries

PEERS_ARTIFACTS = ARTIFACTS / "bench" / "peers"
GPT2_SIZES = {"gpt2_s": dict(n_embd=64, n_layer=2, n_head=4), "gpt2_m": dict(n_embd=128, n_layer=4, n_head=4)}
GPT2_TRAIN_STEPS = 150
MODELS = ("zoo", *GPT2_SIZES)


@dataclass(frozen=True)
class Workload:
    """One cell of the grid (the number of queries varies inside a cell, on the same fitted factors)."""

    model: str  # "zoo", "gpt2_s" or "gpt2_m"
    sequences: int  # N training sequences: factors are fitted and scores computed on the same N
    seq_len: int = 64  # tokens per training sequence
    batch_size: int = 16  # training sequences per batch, for every system and pass
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown bench model {self.model!r}; choose one of {MODELS}")
        if self.sequences < self.batch_size:
            raise ValueError(f"{self.sequences} sequences is less than one batch of {self.batch_size}")

    @property
    def name(self) -> str:
        return f"{self.model}-n{self.sequences}"


@dataclass
class LoadedWorkload:
    workload: Workload
    model_name: str  # e.g. "zoo_s", "micro", "gpt2_s"
    model: torch.nn.Module
    tokenizer: object
    train: dict  # input_ids, attention_mask, labels: (N, seq_len)
    queries: list  # experiments.zoo.queries.Query, in order; the first Q are used for Q queries

    def encoded_queries(self, count: int) -> tuple[list[str], dict[str, torch.Tensor]]:
        """The first `count` queries (repeated if the world has fewer), right-padded: names, batch dict."""
        chosen = [self.queries[i % len(self.queries)] for i in range(count)]
        names = [q.name if i < len(self.queries) else f"{q.name}#{i}" for i, q in enumerate(chosen)]
        return names, encode_queries(self.tokenizer, as_engine_queries(chosen))


BENCH_ZOO_COMMAND = "make bench-zoo"  # world, tokenizer and zoo_s seed 0 of the full preset, ~5 min on one core


class MissingBenchZooError(FileNotFoundError):
    """The bench's zoo model, tokenizer or queries are not built."""


def zoo_paths() -> tuple[str, Path, Path]:
    """(model name, model folder, queries.json) of the bench's zoo model, zoo_s seed 0 of the full world.

    Raises MissingBenchZooError, naming the command that builds it, when it is not there: an earlier version fell
    back to the micro zoo silently, and tables from two machines then compared different workloads (gpt2_m with 0.89M
    against 1.35M parameters: the micro tokenizer's 512-token vocabulary against the full one's 4,096).
    """
    zoo_s = ARTIFACTS / "zoo" / "zoo_s" / "seed0"
    queries = ARTIFACTS / "world" / "full" / "queries.json"
    needed = [zoo_s / "DONE.json", zoo_s / "model" / "model.safetensors", queries]
    missing = [str(p.relative_to(ARTIFACTS.parent)) for p in needed if not p.exists()]
    if missing:
        raise MissingBenchZooError(f"the bench workloads need the zoo model zoo_s seed 0 and the full world's queries; "
                                   f"missing {', '.join(missing)}: run `{BENCH_ZOO_COMMAND}` (~5 min, once)")
    return "zoo_s", zoo_s / "model", queries


def gpt2_tokenizer():
    """("full", tokenizer) for the GPT-2 models: the full zoo world's tokenizer (stable while the zoo models retrain).
    Raises MissingBenchZooError when it is not built."""
    from transformers import AutoTokenizer

    full = ARTIFACTS / "tokenizer" / "full"
    if not (full / "tokenizer.json").exists():
        raise MissingBenchZooError(f"the GPT-2 bench models use the full zoo world's tokenizer; missing "
                                   f"{full.relative_to(ARTIFACTS.parent)}/tokenizer.json: run `{BENCH_ZOO_COMMAND}`")
    tokenizer = AutoTokenizer.from_pretrained(str(full))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return "full", tokenizer


def load_workload(workload: Workload) -> LoadedWorkload:
    from experiments.loading import load_model_and_tokenizer
    from experiments.zoo.queries import load_queries

    if workload.model == "zoo":
        model_name, zoo_model, queries_path = zoo_paths()
        tokenizer_name = model_name
        model, tokenizer = load_model_and_tokenizer(zoo_model)
    else:
        model_name, (tokenizer_name, tokenizer) = workload.model, gpt2_tokenizer()
        queries_path = zoo_paths()[2]
        model = gpt2_model(workload.model, tokenizer, tokenizer_name, workload.seq_len)
    blocks = training_blocks(tokenizer, tokenizer_name, workload.sequences, workload.seq_len)
    model.eval()
    train = {"input_ids": blocks, "attention_mask": torch.ones_like(blocks), "labels": blocks.clone()}
    queries = diverse_queries(load_queries(queries_path), 10**6)
    return LoadedWorkload(workload, model_name, model, tokenizer, train, queries)


def training_blocks(tokenizer, tokenizer_name: str, sequences: int, seq_len: int) -> torch.Tensor:
    """(sequences, seq_len) token ids from an enlarged zoo world, cached; the first rows are the same for any N."""
    from experiments.zoo.train import pack_tokens
    from experiments.zoo.world import PRESETS, generate_documents, world_config

    base = PRESETS["full"]
    full_docs = len(generate_documents(base))
    tokens_per_doc = 65  # a lower bound of the full world's mean (~74 in world v2), so one generation is enough
    scale = max(1, math.ceil(sequences * seq_len / (tokens_per_doc * full_docs)))
    config = world_config("full", per_fact={k: v * scale for k, v in base.per_fact.items()},
                          per_family={k: v * scale for k, v in base.per_family.items()}, seed=7)
    key = _digest([config.as_dict(), tokenizer_digest(tokenizer), seq_len])
    path = PEERS_ARTIFACTS / "data" / f"blocks-{tokenizer_name}-t{seq_len}-{key}.pt"
    if path.exists():
        blocks = torch.load(path)
    else:
        texts = [d["text"] for d in generate_documents(config)]
        blocks = pack_tokens(texts, tokenizer, seq_len)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(blocks, path)
    if len(blocks) < sequences:
        raise ValueError(f"the bench world gave {len(blocks)} sequences of {seq_len} tokens, fewer than {sequences}; "
                         "raise tokens_per_doc's safety margin in training_blocks")
    return blocks[:sequences]


def tokenizer_digest(tokenizer) -> str:
    """Cache keys follow the vocabulary itself: the zoo's tokenizer is rebuilt when its world changes."""
    return _digest(sorted(tokenizer.get_vocab().items()))


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def gpt2_model(size: str, tokenizer, tokenizer_name: str, seq_len: int) -> torch.nn.Module:
    """A GPT-2 architecture model of `size`, built from a config (seed 0), briefly trained, saved and reloaded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tokenizer), n_positions=max(256, seq_len), resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        **GPT2_SIZES[size])
    key = _digest([config.to_dict(), tokenizer_digest(tokenizer), GPT2_TRAIN_STEPS])
    folder = PEERS_ARTIFACTS / "models" / f"{size}-{tokenizer_name}-{key}"
    if not (folder / "model.safetensors").exists():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
        _brief_training(model, training_blocks(tokenizer, tokenizer_name, 4096, 64))
        model.save_pretrained(folder)
        (folder / "bench_model.json").write_text(json.dumps({"size": size, "train_steps": GPT2_TRAIN_STEPS,
                                                             "tokenizer": tokenizer_name}, indent=1))
    return GPT2LMHeadModel.from_pretrained(folder).eval()


def _brief_training(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 16, lr: float = 3e-3) -> None:
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(GPT2_TRAIN_STEPS):
        rows = torch.randint(len(blocks), (batch_size,), generator=generator)
        loss = model(input_ids=blocks[rows], labels=blocks[rows]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:  # linear decay to 10%: a smooth end without a schedule object
            group["lr"] = lr * (1 - 0.9 * step / GPT2_TRAIN_STEPS)
        optimizer.step()
    model.eval()


def describe(loaded: LoadedWorkload) -> dict:
    model = loaded.model
    return {**asdict(loaded.workload), "model_name": loaded.model_name, "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(loaded.tokenizer),
            "tokens": int(loaded.train["attention_mask"].sum())}

