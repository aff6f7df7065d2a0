"""The model zoo: one tiny reference model per gated family, trained deterministically in seconds.

Stage: reference models (what ``load`` reads). Input: a zoo name. Output: a model (``build``), a
trained model with its metrics (``train``), example inputs, or an edgegate checkpoint whose meta
records the dataset, input spec and metrics (``train_and_save``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgegate.data import Dataset, TensorSpec, load_data
from edgegate.datasets import CLUSTERS_KW, MARKOV_CONTEXT, MARKOV_VOCAB
from edgegate.errors import EdgegateError
from edgegate.loading import save
from edgegate.nn import ExitMLP
from edgegate.zoo import models as m
from edgegate.zoo import recipes
from edgegate.zoo.training import deterministic

__all__ = ["ZooEntry", "build", "entry", "example_inputs", "list_models", "train", "train_and_save"]


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model: what it is, what it eats, how to build and train it."""

    name: str
    family: str
    dataset: str
    description: str
    inputs: tuple[TensorSpec, ...]
    builder: Callable[[], nn.Module]
    recipe: Callable[[Any, Dataset, int], dict[str, Any]]  # (model, data, seed) -> metrics

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.inputs)

    def load_data(self) -> Dataset:
        """The entry's dataset, keyed and shaped as the model's input."""
        return load_data(self.dataset, list(self.input_names), {s.name: s.shape for s in self.inputs})


def _x(*shape: int) -> tuple[TensorSpec, ...]:
    return (TensorSpec("x", shape, "float32"),)


_TOKENS = (TensorSpec("tokens", (MARKOV_CONTEXT,), "int64"),)


def _entries() -> list[ZooEntry]:

    def lm(kind: str) -> Callable[[], nn.Module]:
        return lambda: m.TinyLM(vocab=MARKOV_VOCAB, ctx=MARKOV_CONTEXT, linear=kind, rank=8)

    n_feat, n_cls = CLUSTERS_KW["n_features"], CLUSTERS_KW["n_classes"]
    return [
        ZooEntry("gated_attention", "gated_attention", "digits",
                 "image rows as 8 tokens -> headwise gated attention block -> head",
                 _x(8, 8), m.AttentionClassifier, recipes.train_gated_attention),
        ZooEntry("threshold_gate", "threshold_gate", "digits", "MLP with a TauGate threshold layer",
                 _x(64), m.ThresholdMLP, recipes.train_threshold_gate),
        ZooEntry("channel_gate", "channel_gate", "digits",
                 "small CNN with two FTWT-style per-sample channel gates", _x(1, 8, 8),
                 m.ChannelGateCNN, recipes.train_channel_gate),
        ZooEntry("moe", "moe", "digits", "Mixtral-style top-2 of 4 SwiGLU experts, trained to tolerate expert "
                 "skipping", _x(64), lambda: m.MoEClassifier(n_experts=4, k=2),
                 functools.partial(recipes.train_moe, skip_training=0.5)),
        ZooEntry("moe_pp", "moe", "digits", "MoE++: 4 FFN + zero, copy and 2 constant experts, top-2",
                 _x(64), lambda: m.MoEClassifier(n_experts=4, k=2, n_zero=1, n_copy=1, n_const=2),
                 recipes.train_moe),
        ZooEntry("acm", "acm", "clusters", "Adaptive Computation Module: 4 learners, 0-4 run per token (~50%)",
                 _x(n_feat), lambda: m.ACMClassifier(n_feat, n_classes=n_cls), recipes.train_acm),
        ZooEntry("early_exit", "early_exit", "clusters", "3-stage MLP with max-prob exits (~60% leave at 1)",
                 _x(n_feat), lambda: ExitMLP(n_feat, hidden=[16, 32, 64], n_classes=n_cls, n_stages=3),
                 recipes.train_early_exit),
        ZooEntry("ternary_lm", "ternary", "markov", "next-token MLP LM, BitNet b1.58 ternary hidden layers",
                 _TOKENS, lm("ternary"), recipes.train_lm),
        ZooEntry("hgf_lm", "ternary", "markov", "same LM, HGF: ternary + gated rank-8 correction",
                 _TOKENS, lm("hgf"), recipes.train_lm),
        ZooEntry("float_lm", "float", "markov", "same LM in float32 (reference for the ternary models)",
                 _TOKENS, lm("float"), recipes.train_lm),
    ]


def list_models() -> list[ZooEntry]:
    return _entries()


def entry(name: str) -> ZooEntry:
    for e in _entries():
        if e.name == name:
            return e
    raise EdgegateError(f"unknown zoo model {name!r}; see `edgegate zoo list` "
                        f"({', '.join(e.name for e in _entries())})")


def build(name: str) -> nn.Module:
    """An untrained zoo model (train mode)."""
    return entry(name).builder()


def train(name: str, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """Train a zoo model deterministically; returns (model in eval mode, metrics incl. train_seconds)."""
    e = entry(name)
    data = e.load_data()
    start = time.perf_counter()
    with deterministic(seed):
        model = e.builder()  # inside: the seed fixes the initial weights too
        metrics = e.recipe(model, data, seed)
    return model.eval(), {**metrics, "train_seconds": time.perf_counter() - start}


def example_inputs(name: str, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """``batch`` real test samples per input (repeated when the split is smaller), for tracing/export."""
    e = entry(name)
    data = e.load_data().split("test")
    out = []
    for spec in e.inputs:
        x = data.inputs[spec.name]
        x = np.resize(x, (batch, *x.shape[1:])) if batch > len(x) else x[:batch]
        out.append(torch.from_numpy(np.ascontiguousarray(x.astype(spec.dtype))))
    return tuple(out)


def checkpoint_meta(name: str, metrics: dict[str, Any], seed: int) -> dict[str, Any]:
    """The checkpoint meta ``load``/``export`` read: dataset, input spec, metrics."""
    e = entry(name)
    meta: dict[str, Any] = {"zoo": name, "family": e.family, "dataset": e.dataset, "seed": seed,
                            "inputs": [s.to_dict() for s in e.inputs], "metrics": metrics}
    if e.dataset == "markov":
        meta["vocab_size"] = MARKOV_VOCAB
    return meta


def train_and_save(name: str, output: str | Path, seed: int = 0) -> Path:
    """Train ``name`` and write it as an edgegate checkpoint (``edgegate.loading.save``)."""
    model, metrics = train(name, seed)
    path = Path(output)
    save(model, path, meta=checkpoint_meta(name, metrics, seed))
    return path
