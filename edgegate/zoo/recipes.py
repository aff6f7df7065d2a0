"""Training recipes of the zoo models: fixed epochs and hyper-parameters, seconds on 2 cores.

Stage: reference models. Input: an untrained zoo model, its dataset and a seed. Output: the model
trained in place (left in eval mode) and a metrics dict, JSON-serializable and measured on the eval
(hard-gate) path, on the test split unless named ``val_*``. Each recipe is tuned so the zoo targets
asserted in ``tests/unit/test_zoo.py`` hold with margin (e.g. MoE max expert load <= 0.4, ~60 % of
samples leaving at the first exit, ternary LM >= 0.15 nats behind float with HGF recovering >= 40 %, ACM
running <= 60 % of its learners per token within 1 pt of all of them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgegate.data import Dataset
from edgegate.nn import ACMTraining, ExitMLP
from edgegate.zoo.models import ACMClassifier, AttentionClassifier, ChannelGateCNN, MoEClassifier, ThresholdMLP, TinyLM
from edgegate.zoo.training import accuracy, cross_entropy, fit, nll, predict, tensors

Metrics = dict[str, Any]


def _test_acc(model: torch.nn.Module, data: Dataset) -> float:
    x, y = tensors(data, "test")
    return accuracy(predict(model, x), y)  # also leaves the test split's gate decisions recorded


# ---------------------------------------------------------------------------------------------- digits


def train_gated_attention(model: AttentionClassifier, data: Dataset, seed: int) -> Metrics:
    fit(model, *tensors(data, "train"), cross_entropy, epochs=40, batch_size=64, lr=5e-3, seed=seed,
        weight_decay=0.05)
    acc = _test_acc(model, data)
    return {"test_acc": acc, "mean_gate": float(model.attn.last_decision.mean())}


def train_threshold_gate(model: ThresholdMLP, data: Dataset, seed: int) -> Metrics:
    start = model.gate.temperature

    def anneal(epoch: int, epochs: int) -> None:
        # Sharpen the smooth gate towards the hard 1[h > tau] used at inference.
        model.gate.temperature = start * (0.05 / start) ** (epoch / max(epochs - 1, 1))

    fit(model, *tensors(data, "train"), cross_entropy, epochs=40, batch_size=64, lr=3e-3, seed=seed,
        on_epoch=anneal)
    acc = _test_acc(model, data)
    return {"test_acc": acc, "gated_off_fraction": 1.0 - float(model.gate.last_decision.float().mean())}


def train_channel_gate(model: ChannelGateCNN, data: Dataset, seed: int,
                       sparsity_weight: float = 0.3) -> Metrics:
    def loss_fn(m: ChannelGateCNN, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(m(xb), yb)
        return loss + sparsity_weight * sum(g.sparsity_loss for g in m.gates()) / len(m.gates())

    fit(model, *tensors(data, "train"), loss_fn, epochs=20, batch_size=64, lr=3e-3, seed=seed)
    acc = _test_acc(model, data)
    masks = [g.last_decision for g in model.gates()]  # bool [B, C] per gate, on the test split
    pruned = [1.0 - float(m.float().mean()) for m in masks]
    # Channels that are on for some samples and off for others: the pruning is per sample, not static.
    dynamic = [float((m.any(0) & ~m.all(0)).float().mean()) for m in masks]
    return {"test_acc": acc, "pruned_fraction": float(np.mean(pruned)), "pruned_per_gate": pruned,
            "dynamic_channel_fraction": dynamic}


def train_moe(model: MoEClassifier, data: Dataset, seed: int, aux_weight: float = 0.05,
              skip_training: float = 0.0) -> Metrics:
    """Top-k MoE and MoE++ alike: task loss + Switch load-balancing loss over every router slot.

    ``skip_training > 0``: each batch routes with a MoDES skip threshold drawn from U(0, skip_training)
    (slots whose weight falls below it are dropped), so the model learns not to lean on weakly weighted
    experts and tolerates the expert skipping ``export --moe-skip`` calibrates; evaluated without it."""
    router = model.moe.router
    draws = torch.Generator().manual_seed(seed + 1)

    def loss_fn(m: MoEClassifier, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        if skip_training:
            router.set_skip(1.0, float(torch.rand((), generator=draws)) * skip_training)
        return F.cross_entropy(m(xb), yb) + aux_weight * m.moe.aux_loss

    fit(model, *tensors(data, "train"), loss_fn, epochs=25, batch_size=64, lr=3e-3, seed=seed)
    router.set_skip(1.0, 0.0)
    acc = _test_acc(model, data)
    moe = model.moe
    return {"test_acc": acc, "slot_load": [float(v) for v in moe.last_load], "slot_kinds": moe.slot_kinds(),
            "max_expert_load": float(moe.last_load[: moe.n_experts].max()),
            "ffn_per_token": float(moe.last_ffn_per_token)}


# --------------------------------------------------------------------------------- adaptive computation


def train_acm(model: ACMClassifier, data: Dataset, seed: int, tolerance: float = 0.25) -> Metrics:
    """The ACM paper's recipe, from scratch and in seconds. 1) Learners (with embedding and head) trained
    with nested dropout: each sample runs a uniformly drawn k in {0..N}, so every prefix of learners is a
    usable block. 2) The gate pre-trained, everything else frozen, on per-token labels: the smallest k
    whose output is within ``tolerance`` (relative squared error) of all learners' output."""
    acm = model.acm
    acm.train_mode = ACMTraining.NESTED
    fit(model, *tensors(data, "train"), cross_entropy, epochs=20, batch_size=64, lr=3e-3, seed=seed)
    x, _ = tensors(data, "train")
    with torch.no_grad():
        tokens = model.features(x)
    labels = acm.count_labels(tokens, tolerance)

    def gate_loss(m: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(m(xb), yb)

    fit(acm.gate, tokens, labels, gate_loss, epochs=30, batch_size=64, lr=3e-3, seed=seed)  # the gate alone
    model.eval()
    xt, yt = tensors(data, "test")
    acc_per_k = []
    for k in range(acm.n_learners + 1):
        acm.fixed_k = k
        acc_per_k.append(accuracy(predict(model, xt), yt))
    acm.fixed_k = None
    with torch.no_grad():
        logits, count = model(xt)
    hist = np.bincount(count.numpy(), minlength=acm.n_learners + 1) / len(count)
    return {"test_acc": accuracy(logits, yt), "all_learners_acc": acc_per_k[-1], "acc_per_k": acc_per_k,
            "mean_learners": float(count.float().mean()), "n_learners": acm.n_learners,
            "mean_learner_fraction": float(count.float().mean()) / acm.n_learners,
            "learner_histogram": [float(v) for v in hist], "gate_label_mean": float(labels.float().mean())}


# ------------------------------------------------------------------------------------------ early exit


def exit_thresholds(probs: list[np.ndarray], correct: list[np.ndarray], first_fraction: float,
                    tolerance: float) -> list[float]:
    """Exit thresholds on validation data: exit 0 lets ``first_fraction`` of samples leave; each later
    exit takes the lowest threshold whose policy accuracy stays within ``tolerance`` of the last head.

    ``probs[k]``: max softmax prob of head k per sample; ``correct[k]``: head k is right (bool).
    """
    target = float(correct[-1].mean()) - tolerance
    thresholds = [float(np.quantile(probs[0], 1.0 - first_fraction))]
    for k in range(1, len(probs) - 1):
        best = 1.0
        # Lower the threshold while the policy stays accurate enough; stop at the first miss.
        for tau in np.unique(np.round(probs[k], 4))[::-1]:
            if _policy_accuracy(probs, correct, [*thresholds, float(tau)]) < target:
                break
            best = float(tau)
        thresholds.append(best)
    return thresholds


def _policy_accuracy(probs: list[np.ndarray], correct: list[np.ndarray], thresholds: list[float]) -> float:
    n_exits, n = len(probs), len(probs[0])
    exit_at = np.full(n, n_exits - 1)
    for k in reversed(range(len(thresholds))):
        exit_at = np.where(probs[k] >= thresholds[k], k, exit_at)
    return float(np.stack(correct)[exit_at, np.arange(n)].mean())


def fit_exits(model: ExitMLP, data: Dataset, seed: int, *, epochs: int = 40, lr: float = 3e-3,
              first_fraction: float = 0.6) -> None:
    """Train every head of ``model`` on the train split, then set its exit thresholds on the val split."""
    weights = np.linspace(0.5, 1.0, model.n_exits)  # later heads weigh more: they must be the best

    def loss_fn(m: ExitMLP, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        heads = m.forward_all(xb)
        return sum(float(w) * F.cross_entropy(lg, yb) for w, lg in zip(weights, heads, strict=True))

    fit(model, *tensors(data, "train"), loss_fn, epochs=epochs, batch_size=64, lr=lr, seed=seed)
    # Thresholds are set after training, on the validation split (the operating point, DESIGN §5).
    xv, yv = tensors(data, "val")
    with torch.no_grad():
        heads = model.forward_all(xv)
    probs = [torch.softmax(h, -1).amax(-1).numpy() for h in heads]
    correct = [(h.argmax(-1) == yv).numpy() for h in heads]
    model.set_thresholds(exit_thresholds(probs, correct, first_fraction, tolerance=0.003))


def train_early_exit(model: ExitMLP, data: Dataset, seed: int, first_fraction: float = 0.6) -> Metrics:
    fit_exits(model, data, seed, first_fraction=first_fraction)

    x, y = tensors(data, "test")
    with torch.no_grad():
        logits, exit_index = model(x)
        heads = model.forward_all(x)
    fractions = np.bincount(exit_index.numpy(), minlength=model.n_exits) / len(x)
    return {"test_acc": accuracy(logits, y), "last_head_acc": accuracy(heads[-1], y),
            "head_acc": [accuracy(h, y) for h in heads], "exit_fractions": [float(f) for f in fractions],
            "thresholds": [float(t) for t in model.thresholds],
            "mean_stages_run": float((exit_index + 1).float().mean())}


# ------------------------------------------------------------------------------------------ language


def train_lm(model: TinyLM, data: Dataset, seed: int) -> Metrics:
    """Float, ternary and HGF LMs share this recipe, so their losses are comparable."""
    fit(model, *tensors(data, "train"), cross_entropy, epochs=6, batch_size=128, lr=3e-3, seed=seed)
    (xv, yv), (xt, yt) = tensors(data, "val"), tensors(data, "test")
    lv, lt = predict(model, xv), predict(model, xt)
    return {"val_loss": nll(lv, yv), "test_loss": nll(lt, yt), "test_acc": accuracy(lt, yt),
            "entropy_rate": float(data.info["entropy_rate_nats"])}
