"""Deterministic training loop and evaluation helpers shared by the zoo recipes.

Stage: reference models. Input: a model, a ``Dataset`` and a loss. Output: the trained model (in
place). Runs are bit-reproducible on one machine: seeded init and shuffling, and a fixed thread
count (restored afterwards) because reduction order, hence float rounding, depends on it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from edgegate.data import Dataset

TRAIN_THREADS = 1  # tiny layers: one thread is fastest here, and it fixes the summation order

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def deterministic(seed: int, threads: int = TRAIN_THREADS) -> Iterator[None]:
    """Seed torch and pin the intra-op thread count for the duration; restore the caller's settings."""
    old_threads = torch.get_num_threads()
    state = torch.random.get_rng_state()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.random.set_rng_state(state)


def tensors(data: Dataset, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of one split as torch tensors (single-input datasets)."""
    part = data.split(split)
    return torch.from_numpy(np.ascontiguousarray(part.input())), torch.from_numpy(part.labels)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, *, epochs: int,
        batch_size: int, lr: float, seed: int, weight_decay: float = 0.0,
        on_epoch: Callable[[int, int], None] | None = None) -> nn.Module:
    """AdamW with a cosine schedule over ``epochs`` of seeded shuffles. ``on_epoch(epoch, epochs)``
    runs before each epoch (e.g. to anneal a gate temperature)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        if on_epoch is not None:
            on_epoch(epoch, epochs)
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i: i + batch_size]
            loss = loss_fn(model, x[idx], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Eval-mode logits (the hard inference path), batched."""
    model.eval()
    outs = []
    for i in range(0, len(x), batch_size):
        out = model(x[i: i + batch_size])
        outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean())


def nll(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float(nn.functional.cross_entropy(logits, y))
