"""Zoo architectures: one tiny top-level model per family, each rebuildable from ``get_config()``.

Stage: reference models (input of ``load``). Each class takes one input tensor, named by its
``input_names``, float32 [B, ...] or int64 tokens [B, ctx], and returns logits [B, classes] (the
early-exit net, ``edgegate.nn.ExitMLP``, returns ``(logits, exit_index)`` in eval).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgegate.errors import EdgegateError
from edgegate.nn import ACM, ChannelGate, GatedAttention, HGFLinear, MoE, TernaryLinear, ThresholdGate


class _Configured(nn.Module):
    """A zoo model whose constructor keeps its arguments in ``_config``: ``get_config()`` rebuilds it."""

    _config: dict[str, Any]

    def get_config(self) -> dict[str, Any]:
        return dict(self._config)


class AttentionClassifier(_Configured):
    """Rows of an image as tokens [B, T, token_dim] -> one gated-attention block -> mean pool -> head."""

    input_names = ("x",)

    def __init__(self, n_tokens: int = 8, token_dim: int = 8, d_model: int = 32, n_heads: int = 4,
                 gate: str = "headwise", n_classes: int = 10) -> None:
        super().__init__()
        self._config = {"n_tokens": n_tokens, "token_dim": token_dim, "d_model": d_model, "n_heads": n_heads,
                        "gate": gate, "n_classes": n_classes}
        self.embed = nn.Linear(token_dim, d_model)
        self.pos = nn.Parameter(torch.randn(n_tokens, d_model) * 0.02)
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = GatedAttention(d_model, n_heads, gate)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.ReLU(), nn.Linear(2 * d_model, d_model))
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos
        h = h + self.attn(self.norm1(h))
        h = h + self.mlp(self.norm2(h))
        return self.head(h.mean(dim=1))


class ThresholdMLP(_Configured):
    """Linear -> ThresholdGate (TauGate) -> Linear."""

    input_names = ("x",)

    def __init__(self, in_features: int = 64, hidden: int = 128, n_classes: int = 10,
                 temperature: float = 0.3) -> None:
        super().__init__()
        self._config = {"in_features": in_features, "hidden": hidden, "n_classes": n_classes,
                        "temperature": temperature}
        self.fc1 = nn.Linear(in_features, hidden)
        self.gate = ThresholdGate(hidden, temperature=temperature)
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.gate(self.fc1(x)))


class ChannelGateCNN(_Configured):
    """[B, 1, 8, 8] -> conv -> two convs whose output channels are pruned per sample -> head.

    The head reads the flattened 4x4 map (not a global average) so position information survives.
    """

    input_names = ("x",)

    def __init__(self, channels: tuple[int, int, int] | list[int] = (16, 32, 32), n_classes: int = 10,
                 image_size: int = 8) -> None:
        super().__init__()
        c1, c2, c3 = (int(c) for c in channels)
        self._config = {"channels": [c1, c2, c3], "n_classes": n_classes, "image_size": image_size}
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.gate2 = ChannelGate(c1, c2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.gate3 = ChannelGate(c2, c3)
        self.head = nn.Linear(c3 * (image_size // 2) ** 2, n_classes)

    def gates(self) -> list[ChannelGate]:
        return [self.gate2, self.gate3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = self.gate2(h, F.relu(self.conv2(h)))
        h = F.max_pool2d(h, 2)
        h = self.gate3(h, F.relu(self.conv3(h)))
        return self.head(h.flatten(1))


class MoEClassifier(_Configured):
    """Each sample is one token: embed -> residual MoE block (top-k; optional MoE++ experts) -> head.

    Training returns logits; eval returns ``(logits, route_indices)`` (the k routed slot ids per
    sample, int64 [B, k]), so the exported graph has the routing as an output (route histograms).
    """

    input_names = ("x",)
    output_names = ("logits", "route_indices")

    def __init__(self, in_features: int = 64, d_model: int = 32, d_hidden: int = 64, n_experts: int = 4,
                 k: int = 2, n_zero: int = 0, n_copy: int = 0, n_const: int = 0, n_classes: int = 10) -> None:
        super().__init__()
        self._config = {"in_features": in_features, "d_model": d_model, "d_hidden": d_hidden,
                        "n_experts": n_experts, "k": k, "n_zero": n_zero, "n_copy": n_copy,
                        "n_const": n_const, "n_classes": n_classes}
        self.embed = nn.Linear(in_features, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.moe = MoE(d_model, d_hidden, n_experts, k, n_zero, n_copy, n_const)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.embed(x))
        y, route_indices = self.moe.forward_routed(self.norm(h))
        logits = self.head(h + y)
        return logits if self.training else (logits, route_indices)


class ACMClassifier(_Configured):
    """Each sample is one token: embed -> residual Adaptive Computation Module (N learners) -> head.

    Training returns logits; eval returns ``(logits, learner_count)`` (how many learners the sample ran,
    int64 [B]), so the exported graph has the gate's choice as an output (the bench histogram of k).
    """

    input_names = ("x",)
    output_names = ("logits", "learner_count")

    def __init__(self, in_features: int = 16, d_model: int = 32, n_learners: int = 4, d_hidden: int = 8,
                 gate_hidden: int = 16, n_classes: int = 4, act: str = "relu") -> None:
        super().__init__()
        self._config = {"in_features": in_features, "d_model": d_model, "n_learners": n_learners,
                        "d_hidden": d_hidden, "gate_hidden": gate_hidden, "n_classes": n_classes, "act": act}
        self.embed = nn.Linear(in_features, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.acm = ACM(d_model, n_learners, d_hidden, gate_hidden, act)
        self.head = nn.Linear(d_model, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The ACM's input tokens [B, d_model]."""
        return self.norm(F.relu(self.embed(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.embed(x))
        y, count = self.acm.forward_counted(self.norm(h))
        logits = self.head(h + y)
        return logits if self.training else (logits, count)


LINEAR_KINDS = ("float", "ternary", "hgf")


class TinyLM(_Configured):
    """Next-token MLP LM over a fixed context: tokens [B, ctx] -> logits [B, vocab].

    Embedding and output head stay full precision (as in BitNet); the two hidden projections are
    ``nn.Linear``, ``TernaryLinear`` or ``HGFLinear`` per ``linear``, each behind a LayerNorm (BitNet's
    SubLN placement) so all three variants share one architecture.
    """

    input_names = ("tokens",)

    def __init__(self, vocab: int = 16, ctx: int = 8, d_embed: int = 16, hidden: int = 32,
                 linear: str = "float", rank: int = 8) -> None:
        super().__init__()
        if linear not in LINEAR_KINDS:
            raise EdgegateError(f"TinyLM: linear={linear!r} is unknown; use one of {LINEAR_KINDS}")
        self._config = {"vocab": vocab, "ctx": ctx, "d_embed": d_embed, "hidden": hidden, "linear": linear,
                        "rank": rank}
        self.embed = nn.Embedding(vocab, d_embed)
        self.norm1 = nn.LayerNorm(ctx * d_embed)
        self.fc1 = self._linear(ctx * d_embed, hidden, linear, rank)
        self.norm2 = nn.LayerNorm(hidden)
        self.fc2 = self._linear(hidden, hidden, linear, rank)
        self.head = nn.Linear(hidden, vocab)

    @staticmethod
    def _linear(n_in: int, n_out: int, kind: str, rank: int) -> nn.Module:
        if kind == "ternary":
            return TernaryLinear(n_in, n_out, bias=True)
        if kind == "hgf":
            return HGFLinear(n_in, n_out, rank, bias=True)
        return nn.Linear(n_in, n_out)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).flatten(1)
        h = F.relu(self.fc1(self.norm1(h)))
        h = F.relu(self.fc2(self.norm2(h)))
        return self.head(h)
