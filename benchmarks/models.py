"""Models the benchmarks define for themselves (the zoo is too small for compute to dominate).

``ResNetDigits``: a ResNet-style CNN on the digits images [B, 1, 8, 8] (residual 3x3 conv blocks,
no BatchNorm so every conv exports as one Conv with bias). ``TernaryProjection``: one BitNet
``TernaryLinear`` of 4096 x 4096, the ternary kernel benchmark. Both rebuild from ``get_config()``
so ``edgegate.save`` / ``load`` handle them like zoo models.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgegate.nn import TernaryLinear


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1, stride=stride) if (stride != 1 or c_in != c_out) else None
        # Without BatchNorm a block must start as (nearly) the identity to train (Fixup's zero init).
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(x)))
        return F.relu(h + (x if self.skip is None else self.skip(x)))


class ResNetDigits(nn.Module):
    """Stem conv -> ``blocks`` basic blocks at ``width`` (8x8) -> ``blocks`` at 2*width (4x4) -> GAP -> head."""

    input_names = ("x",)

    def __init__(self, width: int = 32, blocks: int = 2, n_classes: int = 10) -> None:
        super().__init__()
        self._config = {"width": width, "blocks": blocks, "n_classes": n_classes}
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        layers = [_Block(width, width, 1) for _ in range(blocks)]
        layers += [_Block(width if i == 0 else 2 * width, 2 * width, 2 if i == 0 else 1) for i in range(blocks)]
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(2 * width, n_classes)

    def get_config(self) -> dict[str, Any]:
        return dict(self._config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(F.relu(self.stem(x)))
        return self.head(h.mean(dim=(2, 3)))


class TernaryProjection(nn.Module):
    """One BitNet b1.58 ``TernaryLinear`` (per-token 8-bit activations, 2-bit packed weights)."""

    input_names = ("x",)

    def __init__(self, features: int = 4096) -> None:
        super().__init__()
        self._config = {"features": features}
        self.proj = TernaryLinear(features, features, bias=False)

    def get_config(self) -> dict[str, Any]:
        return dict(self._config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)
