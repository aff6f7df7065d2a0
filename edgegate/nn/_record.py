"""Shared helpers for the gating modules: recording gate decisions without disturbing export.

Every module in ``edgegate.nn`` remembers its last hard decision (``last_decision``) so calibration
and compare can observe gates. ``torch.export`` refuses modules that assign tensor attributes while
being traced, so recording is skipped whenever an export is in progress.
"""

from __future__ import annotations

import torch
from torch import nn


def exporting() -> bool:
    """True while ``torch.export`` / the dynamo ONNX exporter traces the model."""
    return bool(torch.compiler.is_exporting())


def record(module: nn.Module, **values: object) -> None:
    """Store observation attributes (detached tensors) on ``module`` unless an export is tracing it."""
    if exporting():
        return
    for name, value in values.items():
        setattr(module, name, value.detach() if isinstance(value, torch.Tensor) else value)
