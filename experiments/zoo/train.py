"""GPT-NeoX (Pythia architecture) models of several sizes, trained on CPU on the synthetic world.

Scaling rule (zoo v2): width at fixed depth. Every size has ``DEPTH`` = 4 layers, heads of ``HEAD_DIM`` = 16, MLP width
4h, and a peak learning rate ``0.32 / h`` capped at 1e-2 (5e-3 at h = 64; Adam's step shrinks as the width grows, as
in muP-style rules). Six widths, 32 to 192, span 35x in non-embedding parameters (about 4 (12 h^2 + 13 h)).
A training seed sets the initialisation and the data order (``TrainConfig.seed``); every size sees the same data.

Training is a plain AdamW loop with linear warm-up and cosine decay; it checkpoints every ``checkpoint_every``
steps (model, optimizer, step, RNG, loss log) and resumes from the last checkpoint. A finished model is saved with
``save_pretrained`` beside ``DONE.json`` (config hash, timings); a second run with the same config hash trains
nothing.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ModelSize:
    """Shape of one zoo model; MLP width is 4 x hidden as in Pythia."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    learning_rate: float

    @property
    def intermediate_size(self) -> int:
        return 4 * self.hidden_size


DEPTH, HEAD_DIM = 4, 16


def scaled_size(name: str, hidden_size: int) -> ModelSize:
    """The zoo's scaling rule: width ``hidden_size`` at depth DEPTH, heads of HEAD_DIM, learning rate 0.32 / h."""
    return ModelSize(name, hidden_size, DEPTH, hidden_size // HEAD_DIM, round(min(1e-2, 0.32 / hidden_size), 6))


WIDTHS = {"zoo_2xs": 32, "zoo_xs": 48, "zoo_s": 64, "zoo_m": 96, "zoo_l": 128, "zoo_xl": 192}
SIZES: dict[str, ModelSize] = {
    "micro": ModelSize("micro", hidden_size=32, num_layers=2, num_heads=2, learning_rate=1e-2),
    **{name: scaled_size(name, width) for name, width in WIDTHS.items()},
}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by all sizes (the learning rate comes from ``ModelSize``)."""

    block_size: int = 256  # tokens per packed training sequence
    max_position_embeddings: int = 512
    batch_size: int = 8
    epochs: float = 2.0
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak learning rate
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 200
    eval_every: int = 200
    seed: int = 0  # initialisation and data order
    threads: int = 1
    progress: bool = True


def model_config(size: ModelSize, tokenizer, train: TrainConfig):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        intermediate_size=size.intermediate_size,
        max_position_embeddings=train.max_position_embeddings,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        use_parallel_residual=True,
    )


def non_embedding_parameters(model) -> int:
    """Parameters outside the input embedding and the output (unembedding) matrix."""
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def pack_tokens(texts: list[str], tokenizer, block_size: int) -> torch.Tensor:
    """Concatenate documents, each followed by eos, and cut into (n_blocks, block_size) rows."""
    ids: list[int] = []
    for encoded in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        raise ValueError(f"only {len(ids)} tokens, fewer than one block of {block_size}; lower block_size")
    return torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


def config_hash(*parts) -> str:
    text = json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def learning_rate(step: int, total_steps: int, peak: float, train: TrainConfig) -> float:
    if step < train.warmup_steps:
        return peak * (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return peak * (train.min_lr_ratio + (1 - train.min_lr_ratio) * cosine)


@torch.no_grad()
def evaluate_loss(model, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats per token) over ``blocks``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i : i + batch_size]
        logits = model(input_ids=batch).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += batch[:, 1:].numel()
    model.train()
    return total / count


def _batch_order(n_blocks: int, total_steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of the blocks for every step: a fresh seeded permutation each epoch (same seed, same order for every
    size)."""
    generator = torch.Generator().manual_seed(seed)
    needed = total_steps * batch_size
    order = []
    while sum(len(o) for o in order) < needed:
        order.append(torch.randperm(n_blocks, generator=generator))
    return torch.cat(order)[:needed].view(total_steps, batch_size)


@dataclass
class TrainResult:
    size: str
    seed: int
    model_path: str
    non_embedding_parameters: int
    tokens_trained: int
    steps: int
    train_seconds: float  # wall clock
    heldout_loss: float
    final_train_loss: float
    cpu_seconds: float = 0.0  # CPU time of the training process: the cost on a core of its own, under any load
    selected_step: int = 0  # the step whose weights were kept (the last one without selection queries)
    selection_accuracy: float | None = None  # the kept weights' accuracy on the selection queries (None: no selection)


def train_model(
    size: ModelSize,
    tokenizer_path: Path,
    dataset_path: Path,
    out_dir: Path,
    train: TrainConfig = TrainConfig(),
    stop_after: int | None = None,
    selection_queries: list | None = None,
) -> TrainResult | None:
    """Train one size (or resume it, or return the cached result), ``save_pretrained`` to out_dir/model.

    Writes out_dir/loss_curve.csv (step, tokens, lr, train_loss, heldout_loss, selection_accuracy) and
    out_dir/DONE.json. stop_after: checkpoint and return None once this many steps are done (simulates an
    interruption). selection_queries: queries with distractors (``ranking_accuracy``), evaluated every
    ``eval_every`` steps; the weights with the highest accuracy (ties: the lower held-out loss) are the ones saved
    (early stopping on a validation set; the best weights travel in the resumable checkpoint). Without them the last
    step's weights are saved.
    """
    import datasets
    from transformers import AutoTokenizer, GPTNeoXForCausalLM

    out_dir = Path(out_dir)
    done_file = out_dir / "DONE.json"
    from experiments.zoo.world import dataset_digest

    # the data by content, and the tokenizer's vocabulary: a rebuilt world or tokenizer retrains the model
    vocabulary = hashlib.sha256((Path(tokenizer_path) / "tokenizer.json").read_bytes()).hexdigest()
    selection = [(q.prompt, q.completion, list(q.distractors)) for q in selection_queries or []]
    digest = config_hash(size, dataclasses.replace(train, progress=True, threads=0), dataset_digest(dataset_path), vocabulary,
                         *([selection] if selection else []))
    if done_file.exists():
        done = json.loads(done_file.read_text())
        if done.get("config_hash") == digest:
            return TrainResult(**{"seed": 0, **done["result"]})
    checkpoint_dir = out_dir / "checkpoint"
    state_file = checkpoint_dir / "state.pt"
    if state_file.exists() and torch.load(state_file, weights_only=False).get("config_hash") != digest:
        shutil.rmtree(checkpoint_dir)  # a stale checkpoint from other settings: start over
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(max(1, train.threads))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    world = datasets.load_from_disk(str(dataset_path))
    train_blocks = pack_tokens(world["train"]["text"], tokenizer, train.block_size)
    heldout_blocks = pack_tokens(world["validation"]["text"], tokenizer, train.block_size)
    steps_per_epoch = max(1, len(train_blocks) // train.batch_size)
    total_steps = max(1, int(round(train.epochs * steps_per_epoch)))
    order = _batch_order(len(train_blocks), total_steps, train.batch_size, train.seed)

    torch.manual_seed(train.seed)  # the seed sets the initialisation (and, above, the data order)
    model = GPTNeoXForCausalLM(model_config(size, tokenizer, train))
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=size.learning_rate, betas=(0.9, 0.95),
    )
    step, log, elapsed, cpu_elapsed = 0, [], 0.0, 0.0
    best = {"key": None, "step": 0, "accuracy": None, "model": None}  # the selected weights so far
    if state_file.exists():
        state = torch.load(state_file, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, log, elapsed, cpu_elapsed = state["step"], state["log"], state["elapsed"], state.get("cpu_elapsed", 0.0)
        best = state.get("best", best)
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])

    def save_checkpoint():
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint_dir / "state.pt.tmp"
        torch.save({
            "config_hash": digest, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "log": log, "elapsed": elapsed, "cpu_elapsed": cpu_elapsed, "best": best, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
        }, tmp)
        tmp.replace(state_file)  # atomic: an interrupted save keeps the previous checkpoint
        _write_curve(out_dir / "loss_curve.csv", log)

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, desc=size.name, disable=not train.progress, mininterval=2.0)
    started = time.perf_counter() - elapsed
    cpu_started = time.process_time() - cpu_elapsed
    while step < total_steps:
        lr = learning_rate(step, total_steps, size.learning_rate, train)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = train_blocks[order[step]]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        step += 1
        row = {"step": step, "tokens": step * train.batch_size * train.block_size, "lr": lr, "train_loss": loss.item(),
               "heldout_loss": "", "selection_accuracy": ""}
        if step % train.eval_every == 0 or step == total_steps:
            row["heldout_loss"] = evaluate_loss(model, heldout_blocks)
            if selection_queries:
                row["selection_accuracy"] = ranking_accuracy(model, tokenizer, selection_queries)
                model.train()
                key = (row["selection_accuracy"], -row["heldout_loss"])
                if best["key"] is None or key > tuple(best["key"]):
                    best = {"key": key, "step": step, "accuracy": row["selection_accuracy"],
                            "model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        log.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}", refresh=False)
        elapsed = time.perf_counter() - started
        cpu_elapsed = time.process_time() - cpu_started
        if step % train.checkpoint_every == 0 and step < total_steps:
            save_checkpoint()
        if stop_after is not None and step >= stop_after and step < total_steps:
            save_checkpoint()
            bar.close()
            return None
    bar.close()

    if best["model"] is not None:
        model.load_state_dict(best["model"])
    selected_step = best["step"] if best["model"] is not None else step
    model.save_pretrained(str(out_dir / "model"))
    tokenizer.save_pretrained(str(out_dir / "model"))  # the model folder loads on its own, like a hub model
    _write_curve(out_dir / "loss_curve.csv", log)
    heldout = [r["heldout_loss"] for r in log if r["heldout_loss"] != "" and r["step"] <= selected_step]
    recent = [r["train_loss"] for r in log[-20:]]
    result = TrainResult(
        size=size.name,
        seed=train.seed,
        model_path=str(out_dir / "model"),
        non_embedding_parameters=non_embedding_parameters(model),
        tokens_trained=step * train.batch_size * train.block_size,
        steps=step,
        train_seconds=round(elapsed, 1),
        cpu_seconds=round(cpu_elapsed, 1),
        heldout_loss=heldout[-1] if heldout else evaluate_loss(model, heldout_blocks),
        final_train_loss=sum(recent) / len(recent),
        selected_step=selected_step,
        selection_accuracy=best["accuracy"],
    )
    done_file.write_text(json.dumps({"config_hash": digest, "result": dataclasses.asdict(result)}, indent=1))
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return result


def _write_curve(path: Path, log: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "tokens", "lr", "train_loss", "heldout_loss", "selection_accuracy"],
                                restval="")
        writer.writeheader()
        writer.writerows(log)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def completion_logprob(model, tokenizer, prompt: str, completions: list[str]) -> list[float]:
    """log p(completion | prompt), summed over the completion's tokens, for each completion (one right-padded
    forward pass for all of them; right padding leaves every real token's position and logits unchanged)."""
    model.eval()
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    sequences = [prompt_ids + ids for ids in tokenizer(list(completions), add_special_tokens=False)["input_ids"]]
    width = max(len(ids) for ids in sequences)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([seq + [pad] * (width - len(seq)) for seq in sequences])
    mask = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq in sequences])
    logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
    token_logprobs = logprobs.gather(-1, ids[:, 1:, None])[..., 0]
    return [token_logprobs[i, len(prompt_ids) - 1 : len(seq) - 1].sum().item() for i, seq in enumerate(sequences)]


def ranking_hits(model, tokenizer, queries) -> list[bool]:
    """Per query: does the true completion outscore every distractor?"""
    hits = []
    for q in queries:
        scores = completion_logprob(model, tokenizer, q.prompt, [q.completion] + [" " + d for d in q.distractors])
        hits.append(bool(scores[0] > max(scores[1:])))
    return hits


def ranking_accuracy(model, tokenizer, queries) -> float:
    """Share of queries whose true completion outscores every distractor (chance = 1 / (1 + n_distractors))."""
    return sum(ranking_hits(model, tokenizer, queries)) / len(queries) if queries else float("nan")
