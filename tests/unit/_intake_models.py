"""Test-only modules for the intake tests: a two-input network and a user gate a test converter replaces."""

from __future__ import annotations

import torch
from torch import nn


class AudioLike(nn.Module):
    """Two inputs like silero-vad's ``(x, sr)``: a frame [B, 1, 16] and a per-row rate [B, 1] -> logits [B, 2]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 + 1, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, sr: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        return self.out(torch.relu(self.fc(torch.cat([h, sr / 16000.0], dim=1))))


class HardThreshold(nn.Module):
    """A user's own hard threshold (``h * 1[h > tau]``): what a converter maps to ``edgegate.nn.ThresholdGate``."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.tau = nn.Parameter(torch.linspace(-0.5, 0.5, features))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (h > self.tau)


class GatedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.gate = HardThreshold(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.gate(self.fc1(x)))
