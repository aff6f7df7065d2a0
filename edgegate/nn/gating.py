"""Neuron and channel gates: TauGate-style thresholds and FTWT-style dynamic channel pruning.

Stage: model family (``edgegate.nn``).

* ``ThresholdGate`` — input: pre-activations ``h`` [..., features]; output: ``h * gain * 1[h > tau]``
  (hard, eval) or its smooth relaxation ``h * gain * sigmoid((h - tau) / temperature)`` (training).
* ``ChannelGate`` — input: the gated layer's input ``x`` [B, C_in, ...] and output ``y``
  [B, C_out, ...]; output: ``y`` with the channels whose predicted mask is off set to zero.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgegate.gates import GateFamily, GateKind, Observe, register_family
from edgegate.nn._record import exporting, record
from edgegate.ops import torch_ops as ops


class ThresholdGate(nn.Module):
    """Per-neuron learned threshold ``tau`` and gain; ``last_decision`` (eval) = bool mask ``h > tau``."""

    def __init__(self, features: int, temperature: float = 0.1, init_tau: float = 0.0) -> None:
        super().__init__()
        self.features, self.init_tau = features, init_tau
        self.temperature = float(temperature)  # may be annealed during training; config keeps the start
        self._init_temperature = float(temperature)
        self.tau = nn.Parameter(torch.full((features,), float(init_tau)))
        self.gain = nn.Parameter(torch.ones(features))
        self.last_decision: torch.Tensor | None = None

    def get_config(self) -> dict[str, Any]:
        return {"features": self.features, "temperature": self._init_temperature, "init_tau": self.init_tau}

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.training:
            # Smooth surrogate so tau receives gradients; it tends to the hard gate as temperature -> 0.
            return h * self.gain * torch.sigmoid((h - self.tau) / self.temperature)
        if not exporting():
            record(self, last_decision=h > self.tau)
        return ops.threshold_gate(h, self.tau, self.gain)


class ChannelGate(nn.Module):
    """Predicts a hard mask over ``out_channels`` from the layer input (global average pool -> linear).

    Training uses a straight-through mask (hard forward, sigmoid gradient) and exposes
    ``sparsity_loss`` (mean open-probability) after each forward, to be added to the task loss with a
    weight. ``last_decision`` (eval) = bool mask [B, out_channels] (True = channel kept).
    """

    def __init__(self, in_channels: int, out_channels: int, init_open: float = 3.0) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.init_open = in_channels, out_channels, init_open
        self.predictor = nn.Linear(in_channels, out_channels)
        with torch.no_grad():
            # Start with every channel open (sigmoid(3) = 0.95) so pruning is learned, not inherited.
            self.predictor.bias.fill_(float(init_open))
        self.sparsity_loss: torch.Tensor | None = None
        self.last_decision: torch.Tensor | None = None

    def get_config(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "init_open": self.init_open}

    def train(self, mode: bool = True) -> ChannelGate:
        # The training loss holds an autograd graph; drop it so eval models deep-copy and pickle.
        self.sparsity_loss = None
        return super().train(mode)

    def mask_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Mask logits [B, out_channels] from the layer input [B, C_in] or [B, C_in, *spatial]."""
        pooled = x.flatten(2).mean(-1) if x.dim() > 2 else x
        return self.predictor(pooled)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.mask_logits(x)
        shape = (*logits.shape, *([1] * (y.dim() - 2)))  # [B, C, 1, 1] for conv maps, [B, C] for features
        if self.training:
            soft = torch.sigmoid(logits)
            mask = (soft > 0.5).to(y.dtype) + soft - soft.detach()
            self.sparsity_loss = soft.mean()
            return y * mask.reshape(shape)
        if not exporting():
            record(self, last_decision=torch.sigmoid(logits) > 0.5)
        return ops.channel_gate(y, logits.reshape(shape))


register_family(ThresholdGate, GateFamily(
    GateKind.THRESHOLD, Observe.DECISION, details=lambda m: {"features": m.features},
    decision_layers=lambda m, info, model: [],  # tau and gain are vectors inside its op, not a layer
    summary="hard per-neuron threshold 1[h > tau] (ThresholdGate); no layer to keep float"))
register_family(ChannelGate, GateFamily(
    GateKind.CHANNEL, Observe.DECISION,
    details=lambda m: {"in_channels": m.in_channels, "out_channels": m.out_channels},
    decision_layers=lambda m, info, model: [(m.predictor, "channel-mask predictor")],
    summary="predicted channel mask (ChannelGate); the predictor stays float"))
