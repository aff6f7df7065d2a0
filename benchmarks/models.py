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


# ----------------------------------------------------------------------------- real-size CNNs (224 x 224)
# torchvision's PyPI wheel is a CUDA build that does not import beside the CPU torch used here, so the two
# architectures are written out, layer for layer as torchvision defines them (ResNet-18: He et al. 2016;
# MobileNetV3-small: Howard et al. 2019). Weights are seeded random; BatchNorm statistics are set by
# ``recalibrate_batchnorm`` on real image crops so activations have the scale a trained network has.


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18 (torchvision ``resnet18``): 7x7 stem, max-pool, 4 stages of 2 basic blocks, GAP, fc.

    ``width`` scales every stage (64 is ResNet-18; tests use 8)."""

    input_names = ("x",)

    def __init__(self, n_classes: int = 1000, width: int = 64) -> None:
        super().__init__()
        self._config = {"n_classes": n_classes, "width": width}
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        chans = [width, 2 * width, 4 * width, 8 * width]
        stages, c_in = [], width
        for i, c in enumerate(chans):
            stages.append(nn.Sequential(BasicBlock(c_in, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)))
            c_in = c
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(chans[-1], n_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def get_config(self) -> dict[str, Any]:
        return dict(self._config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(self.avgpool(x)))))
        return scale * x


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, kernel: int, expanded: int, c_out: int, se: bool, hs: bool, stride: int) -> None:
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != c_in:
            layers += [nn.Conv2d(c_in, expanded, 1, bias=False), nn.BatchNorm2d(expanded), act()]
        layers += [nn.Conv2d(expanded, expanded, kernel, stride, (kernel - 1) // 2, groups=expanded, bias=False),
                   nn.BatchNorm2d(expanded), act()]
        if se:
            layers.append(SqueezeExcitation(expanded, _make_divisible(expanded // 4)))
        layers += [nn.Conv2d(expanded, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


# torchvision's mobilenet_v3_small settings: (in, kernel, expanded, out, squeeze-excite, hardswish, stride)
MOBILENET_V3_SMALL = ((16, 3, 16, 16, True, False, 2), (16, 3, 72, 24, False, False, 2),
                      (24, 3, 88, 24, False, False, 1), (24, 5, 96, 40, True, True, 2),
                      (40, 5, 240, 40, True, True, 1), (40, 5, 240, 40, True, True, 1),
                      (40, 5, 120, 48, True, True, 1), (48, 5, 144, 48, True, True, 1),
                      (48, 5, 288, 96, True, True, 2), (96, 5, 576, 96, True, True, 1),
                      (96, 5, 576, 96, True, True, 1))


class MobileNetV3Small(nn.Module):
    """MobileNetV3-small (torchvision ``mobilenet_v3_small``, width 1.0): hardswish stem, 11 inverted residual
    blocks (squeeze-excite with hardsigmoid), 1x1 conv to 576, GAP, 576 -> 1024 (hardswish) -> classes."""

    input_names = ("x",)

    def __init__(self, n_classes: int = 1000) -> None:
        super().__init__()
        self._config = {"n_classes": n_classes}
        layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish()]
        layers += [InvertedResidual(*cfg) for cfg in MOBILENET_V3_SMALL]
        layers += [nn.Conv2d(96, 576, 1, bias=False), nn.BatchNorm2d(576), nn.Hardswish()]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(576, 1024), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(1024, n_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def get_config(self) -> dict[str, Any]:
        return dict(self._config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch: int = 32) -> nn.Module:
    """Set every BatchNorm's running statistics from ``images`` (a forward in train mode, momentum None: the
    cumulative average); returns the model in eval mode. Seeded random weights then give activations of
    unit scale per channel, as a trained network has, instead of a scale that drifts with depth."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            model(images[i:i + batch])
    for m in bns:
        m.momentum = 0.1
    return model.eval()
