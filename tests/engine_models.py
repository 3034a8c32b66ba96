"""Tiny models and tasks for the engine tests (float64, seconds to run)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from influence_core import CausalLMTask, Task, iterate_batches

VOCAB = 16


class ClassificationTask(Task):
    """A classifier as a one-position sequence model: logits (B, 1, C), labels (B, 1)."""

    def forward(self, model, batch):
        return model(batch["x"]).unsqueeze(1), batch["y"].unsqueeze(1)


def mlp_classifier(seed: int = 0, d_in: int = 5, hidden: int = 7, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes)).double()


def classification_batches(n: int, seed: int = 1, d_in: int = 5, classes: int = 4, batch_size: int = 4):
    g = torch.Generator().manual_seed(seed)
    data = {"x": torch.randn(n, d_in, generator=g, dtype=torch.float64), "y": torch.randint(0, classes, (n,), generator=g)}
    return iterate_batches(data, batch_size)


def gpt_neox(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=12, max_position_embeddings=16)
    return GPTNeoXForCausalLM(config).double().eval()


def gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=8, n_layer=2, n_head=2, n_inner=12, n_positions=16)
    return GPT2LMHeadModel(config).double().eval()


def token_batches(n: int, length: int = 6, seed: int = 2, batch_size: int = 4, pad_last: bool = True):
    """Random token sequences; the first one right-padded, to exercise masking."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    if pad_last:
        mask[0, length - 2 :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return iterate_batches({"input_ids": ids, "attention_mask": mask, "labels": labels}, batch_size)


def query_batches(n: int = 3, length: int = 5, seed: int = 3, batch_size: int | None = None):
    """Queries: the first two tokens are the prompt (ignored), the rest the completion; one batch unless batch_size."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    return iterate_batches({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, batch_size or n)


class FixedLabelTask(CausalLMTask):
    """Pseudo labels that are a fixed function of the input, so a brute-force loop can reproduce them."""

    @staticmethod
    def fixed_labels(batch):
        labels = (batch["input_ids"] * 5 + 3) % VOCAB
        return labels.masked_fill(batch["labels"] == -100, -100)

    def pseudo_loss(self, model, batch, generator):
        return self.training_loss(model, {**batch, "labels": self.fixed_labels(batch)})


# A tiny classifier with fitted factors, as the opening of a script run in a subprocess (a build killed mid-way):
# defines model, layers, task, train, factors.
SUBPROCESS_CLASSIFIER = """
import sys, time
import torch
from torch import nn
from influence_core import FactorArguments, Task, fit_factors, iterate_batches, track_layers

class Classify(Task):  # plain torch: the subprocess starts without importing transformers
    def forward(self, model, batch):
        return model(batch["x"]).unsqueeze(1), batch["y"].unsqueeze(1)

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()
layers, task = track_layers(model, ["0", "2"]), Classify()
g = torch.Generator().manual_seed(1)
train = {"x": torch.randn(10, 5, generator=g, dtype=torch.float64), "y": torch.randint(0, 4, (10,), generator=g)}
factors = fit_factors(model, layers, task, iterate_batches(train, 4), FactorArguments(dtype="float64", progress=False))
"""


@contextmanager
def gloo_process_group(rank: int, world: int, root: str):
    """A spawned test worker's CPU process group (gloo, file store under root), one thread, torn down on exit."""
    import os

    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
