"""The task: what the engine needs to know of a model's semantics, and nothing more.

A task turns a batch into logits at the predicted positions and the labels there. From that one method the
engine derives every loss it needs:

- training loss of a sequence z:      L(z) = sum_t CE(logits_t, label_t)            (summed, not averaged)
- query loss (measurement):           -f = -log p(completion | prompt) = sum over completion tokens of CE
- pseudo loss for the true Fisher:    sum_t CE(logits_t, y_t) with y_t ~ softmax(logits_t) (sampled labels)

Labels equal to IGNORE_INDEX (-100) do not count (padding, and the prompt of a query).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .batch import SOURCE_ROWS, Batch, row_count

IGNORE_INDEX = -100


class Task:
    """Base class: subclass and implement `forward`. Override the losses only for a different measurement."""

    def forward(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits (B, T, C), labels (B, T) with IGNORE_INDEX where nothing is predicted)."""
        raise NotImplementedError

    def token_mask(self, batch: Batch) -> torch.Tensor | None:
        """(B, T_in) bool, True at real input tokens (padding excluded); None if every position is real."""
        return None

    def label_counts(self, batch: Batch) -> torch.Tensor | None:
        """(B,) number of predicted (non-ignored) labels per row, without a forward pass; None if unknown."""
        return None

    def training_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits, labels = self.forward(model, batch)
        return summed_cross_entropy(logits, labels)

    def query_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """-f summed over the batch; by default the same cross-entropy, with the prompt labels ignored."""
        logits, labels = self.forward(model, batch)
        return summed_cross_entropy(logits, labels)

    def pseudo_loss(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """Loss on labels sampled from the model's own predictive distribution (true Fisher, paper Sec 2.2)."""
        logits, labels = self.forward(model, batch)
        valid = labels != IGNORE_INDEX
        sampled = sample_labels(logits.detach(), generator)
        return summed_cross_entropy(logits, torch.where(valid, sampled, IGNORE_INDEX))


def trim_padding(batch: Batch) -> tuple[Batch, int]:
    """(the batch without the trailing columns that are padding in every row (attention_mask 0 throughout), the number
    of columns dropped).

    Sequences right-padded to the longest of a whole data set (or query set) make every pass pay for that width in
    every batch; dropping the columns no row uses changes no real token's activations or gradients (right padding
    sits after the real tokens). Batches without a 2-D attention_mask, or without such columns, are returned as is,
    with 0.
    """
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return batch, 0
    used = mask.any(dim=0).nonzero()
    width = int(used[-1]) + 1 if len(used) else 1
    if width == mask.shape[1]:
        return batch, 0
    return ({k: v[:, :width] if isinstance(v, torch.Tensor) and v.shape[:2] == mask.shape else v
             for k, v in batch.items()}, mask.shape[1] - width)


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum over positions with label != IGNORE_INDEX of -log softmax(logits)[label]; logits (B,T,C).

    Only the predicted rows enter the log-softmax: logits[valid] (n, C) is the one copy that the reshape of the
    shifted, non-contiguous logits made anyway, and a query (prompt + completion, labels on the completion only)
    no longer holds a log-softmax and a copy of every prompt position's logits (zoo_s, 32 queries of 92 tokens,
    45 MiB of logits: `query_gradients`' peak 220 -> 194 MiB above its start). Same rows, same per-row losses and
    gradients; only the order of the sum changes.
    """
    valid = labels != IGNORE_INDEX
    if bool(valid.all()):
        rows, targets = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    else:
        rows, targets = logits[valid], labels[valid]
    if rows.dtype in (torch.float16, torch.bfloat16):
        rows = rows.float()  # half-precision log-softmax loses the small differences influence is made of
    return F.cross_entropy(rows, targets, reduction="sum")


def sample_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """y ~ Categorical(softmax(logits)) at every position; logits (..., C) -> (...).

    Inverse-CDF sampling with one uniform per position from the (CPU) generator, so the labels do not depend
    on the device. (Gumbel-max drew |positions| x |vocabulary| uniforms and torch.multinomial was no faster:
    either took most of a fitting pass.)
    """
    return _inverse_cdf_sample(torch.softmax(logits.detach().float(), dim=-1), generator)


def _inverse_cdf_sample(probs: torch.Tensor, generator: torch.Generator, dropped_positions: int = 0) -> torch.Tensor:
    """y ~ Categorical(probs) per position, one uniform per position, row-major: probs (..., C) -> (...).

    dropped_positions > 0 (probs (B, T, C)): uniforms are drawn for (B, T + dropped_positions) and the last
    dropped_positions of each row discarded, as if the rows were that much longer.
    """
    cdf = probs.reshape(-1, probs.shape[-1]).cumsum(dim=-1)
    if dropped_positions:
        rows, positions = probs.shape[0], probs.shape[1]
        uniform = torch.rand(rows, positions + dropped_positions, generator=generator)[:, :positions].reshape(-1, 1)
    else:
        uniform = torch.rand(cdf.shape[0], 1, generator=generator)
    uniform = uniform.to(cdf.device) * cdf[:, -1:]
    labels = torch.searchsorted(cdf, uniform, right=True).clamp_max_(probs.shape[-1] - 1)
    return labels.reshape(probs.shape[:-1])


def sampled_label_surrogate(logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                            dropped_positions: int = 0) -> torch.Tensor:
    """A scalar with the gradient of the default `Task.pseudo_loss`: sum_t (p_t - e_{y_t})^T logits_t, p detached.

    d CE(logits_t, y_t) / d logits_t = p_t - e_{y_t}, so this is the true-Fisher pseudo-gradient with the labels
    `sample_labels` draws (same generator, same draws), without the cross-entropy's second pass over the vocabulary
    (log-softmax forward and backward, and a copy of the shifted logits). logits (B, T, C), labels (B, T).
    dropped_positions: positions per row that `trim_padding` removed; their uniforms are drawn and discarded, so the
    labels are exactly those of the untrimmed batch (and a trimmed fit reproduces an untrimmed one).
    """
    probs = torch.softmax(logits.detach().float(), dim=-1)
    sampled = _inverse_cdf_sample(probs, generator, dropped_positions)  # the draws of sample_labels, from float32 probabilities
    if logits.dtype == torch.float64:  # the cross-entropy it replaces is float64 there: so is p in p - e_y
        probs = torch.softmax(logits.detach(), dim=-1)
    residual = probs.scatter_add_(-1, sampled.unsqueeze(-1), probs.new_full((*sampled.shape, 1), -1.0))  # p - e_y
    residual.mul_((labels != IGNORE_INDEX).unsqueeze(-1))
    return (logits * residual.to(logits.dtype)).sum()


def context_length(model: nn.Module) -> int | None:
    """The model's maximum sequence length from its config (GPT-NeoX, LLaMA: max_position_embeddings; GPT-2: n_positions)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


class CausalLMTask(Task):
    """Next-token prediction for a Hugging Face causal LM.

    Batches are dicts with `input_ids` (B, T), `attention_mask` (B, T) and `labels` (B, T), the labels
    aligned with input_ids as in transformers (shifted inside: the logits at t predict the label at t + 1).
    """

    def forward(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, T-1, C), labels (B, T-1)): the labels shifted, IGNORE_INDEX wherever attention_mask is 0.

        Padding is masked here whatever the batch's labels say, so the loss never counts a position whose
        activations the engine zeroes (labels = input_ids at padding would otherwise enter the loss).
        """
        input_ids = self._require(batch, "input_ids")
        labels = self.predicted_labels(batch)
        limit = context_length(model)
        if limit is not None and input_ids.shape[1] > limit:
            raise ValueError(
                f"sequences of {input_ids.shape[1]} tokens exceed the model's context of {limit}; "
                "truncate or split them before scoring"
            )
        out = model(input_ids=input_ids, attention_mask=batch.get("attention_mask"))
        logits = out.logits if hasattr(out, "logits") else out
        return logits[:, :-1], labels

    @staticmethod
    def _require(batch: Batch, key: str) -> torch.Tensor:
        if key not in batch:
            raise ValueError(f"the batch has no '{key}' (keys: {sorted(batch)}); CausalLMTask needs input_ids, "
                             "attention_mask and labels (labels = input_ids with -100 where nothing is predicted)")
        return batch[key]

    def predicted_labels(self, batch: Batch) -> torch.Tensor:
        """labels[:, 1:] (B, T-1) with IGNORE_INDEX where attention_mask[:, 1:] is 0."""
        labels = self._require(batch, "labels")[:, 1:]
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            labels = labels.masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
        return labels

    def label_counts(self, batch: Batch) -> torch.Tensor:
        return (self.predicted_labels(batch) != IGNORE_INDEX).sum(dim=1)

    def token_mask(self, batch: Batch) -> torch.Tensor | None:
        mask = batch.get("attention_mask")
        return None if mask is None else mask.bool()


@dataclass(frozen=True)
class Query:
    """A measurement f = log p(completion | prompt), e.g. Query("water", "Water is composed of", " hydrogen and oxygen.")."""

    name: str
    prompt: str
    completion: str


def encode_queries(tokenizer, queries: Sequence[Query], max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Tokenize prompt and completion separately and concatenate, so the boundary is exact.

    Returns input_ids, attention_mask, labels (B, T), right-padded; labels are IGNORE_INDEX on the prompt and
    padding, so only completion tokens count in f. Raises ValueError for an empty completion or an
    over-long query.
    """
    rows = []
    for q in queries:
        prompt_ids = tokenizer(q.prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(q.completion, add_special_tokens=False)["input_ids"]
        if len(completion_ids) == 0:
            raise ValueError(f"query '{q.name}' has an empty completion; give at least one token")
        if len(prompt_ids) == 0:
            raise ValueError(f"query '{q.name}' has an empty prompt; give at least one token")
        ids = prompt_ids + completion_ids
        if max_length is not None and len(ids) > max_length:
            raise ValueError(f"query '{q.name}' has {len(ids)} tokens, over the limit of {max_length}")
        rows.append((ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids))
    return pad_sequences(rows, pad_id=tokenizer.pad_token_id or 0)


def pad_sequences(rows: Sequence[tuple[list[int], list[int]]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """(input_ids, labels) pairs -> right-padded tensors input_ids, attention_mask, labels (B, T_max)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def iterate_batches(encoded: Mapping[str, torch.Tensor], batch_size: int,
                    by_length: bool = False) -> list[dict[str, torch.Tensor]]:
    """Split a dict of (N, ...) tensors into a list of batches of at most batch_size rows.

    by_length=True: the rows grouped by their number of real tokens (attention_mask), shortest first, so each batch
    pads only to its own longest row (`trim_padding` drops the rest), and each batch carries SOURCE_ROWS (B,), its
    rows' indices in `encoded`. `query_gradients` returns its rows in the order of `encoded` whatever the batches,
    and a fit sums over rows; `compute_scores` and `build_index`, whose outputs are per row, refuse such batches.
    The bench's 128 queries of 6-92 tokens: 8,896 token positions in batches of 32 as given, 4,672 grouped.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    n = row_count(encoded)
    if n == 0:
        raise ValueError("no sequences to batch: the data set is empty")
    if by_length:
        mask = encoded.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError("by_length=True groups rows by their attention_mask, and these data have none (keys: "
                             f"{sorted(encoded)}); give a 2-D attention_mask or by_length=False")
        order = torch.argsort(mask.sum(dim=1), stable=True)
        encoded = {**{k: v[order] if isinstance(v, torch.Tensor) else [v[i] for i in order.tolist()]
                      for k, v in encoded.items()}, SOURCE_ROWS: order}
    return [{k: v[i : i + batch_size] for k, v in encoded.items()} for i in range(0, n, batch_size)]
