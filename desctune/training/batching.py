"""Training batches from the stored input_ids/labels (no re-tokenizing): length-grouped so each batch is right-padded
only to its own longest example, by example count or by a token budget, in an order fixed by the seed so a resumed
run replays exactly the batches the killed one would have seen."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pandas as pd
import torch

from desctune.config import TrainConfig
from desctune.data.tokenize import IGNORE


def load_examples(path: str | Path) -> list[tuple[list[int], list[int]]]:
    df = pd.read_parquet(path, columns=["input_ids", "labels"])
    return [(list(a), list(b)) for a, b in zip(df["input_ids"], df["labels"])]


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffle, sort by length within windows of 64 batches, then shuffle the batches: little padding, random order.

    Deterministic in `seed`, so a resumed run replays exactly the batches the killed one would have seen."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 64
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def token_budget_batches(lengths: list[int], max_tokens: int, seed: int) -> list[list[int]]:
    """Length-grouped like `length_grouped_batches`, but each batch takes as many examples as fit `max_tokens` padded
    tokens (count x its longest): a batch of long examples stays within memory, one of short ones fills the card.
    An example longer than the budget is a batch of its own. Deterministic in `seed`."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    typical = max(1, max_tokens * len(lengths) // max(1, sum(lengths)))
    window = typical * 64
    batches = []
    for start in range(0, len(order), window):
        batch: list[int] = []
        for i in sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True):
            if batch and (len(batch) + 1) * lengths[batch[0]] > max_tokens:
                batches.append(batch)
                batch = []
            batch.append(i)
        batches.append(batch)
    rng.shuffle(batches)
    return batches


def epoch_batches(lengths: list[int], t: TrainConfig, max_tokens: int | None, seed: int) -> list[list[int]]:
    """One epoch's micro-batches: by token budget where the plan sets one, else `t.batch_size` examples each."""
    if max_tokens:
        return token_budget_batches(lengths, max_tokens, seed)
    return length_grouped_batches(lengths, t.batch_size, seed)


def total_steps(n_batches: int, t: TrainConfig) -> int:
    per_epoch = math.ceil(n_batches / t.grad_accum)
    return t.max_steps or max(1, math.ceil(t.epochs * per_epoch))


def micro_batches(lengths: list[int], t: TrainConfig, steps: int, max_tokens: int | None = None) -> list[list[int]]:
    """The whole run's micro-batches in order: as many length-grouped epochs as `steps` optimizer steps need."""
    needed, out, epoch = steps * t.grad_accum, [], 0
    while len(out) < needed:
        out += epoch_batches(lengths, t, max_tokens, t.seed + epoch)
        epoch += 1
    return out[:needed]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Right-pad to the batch's longest example (labels with IGNORE); also the count of real tokens."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
    return ids, labels, sum(len(x) for x, _ in examples)
