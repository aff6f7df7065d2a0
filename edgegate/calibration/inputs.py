"""Checking calibration / evaluation data before any work is done.

Stage: calibration input. Input: a numpy array or torch tensor (one model input, batch first) and
optionally labels and the model's :class:`TensorSpec`. Output: a torch tensor, or a
:class:`DataError` naming the tensor and saying what to fix (empty, NaN/Inf, dtype, shape).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from edgegate.data import TensorSpec, validate_inputs
from edgegate.errors import DataError


def input_name(model: nn.Module, spec: TensorSpec | None = None) -> str:
    if spec is not None:
        return spec.name
    names = getattr(model, "input_names", None) or ("input",)
    return str(names[0])


def as_input(data: Any, name: str, spec: TensorSpec | None = None, source: str = "calibration data") -> torch.Tensor:
    """``data`` as a tensor once it is non-empty, finite and (with ``spec``) of the right dtype/shape."""
    if isinstance(data, torch.Tensor):
        array = data.detach().cpu().numpy()
    elif isinstance(data, np.ndarray):
        array = data
    else:
        raise DataError(f"{source}: input {name!r} must be a numpy array or a torch tensor, "
                        f"got {type(data).__name__}")
    if spec is not None:
        validate_inputs({name: array}, [spec], source=source)
    else:
        if array.ndim == 0 or array.size == 0:
            raise DataError(f"{source}: input {name!r} is empty (shape {array.shape}); provide at least one "
                            "sample, batch first")
        if array.dtype.kind in "fc":
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            if bad:
                raise DataError(f"{source}: input {name!r} has {bad} NaN/Inf values; clean or drop those samples")
    if isinstance(data, torch.Tensor):
        return data.detach()
    return torch.from_numpy(np.ascontiguousarray(array))


def check_fits(model: nn.Module, x: torch.Tensor, name: str, source: str = "calibration data") -> None:
    """Run the model on two samples: a shape or dtype the model cannot take becomes a DataError."""
    try:
        with torch.no_grad():
            model(x[:2])
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{source}: input {name!r} of shape {tuple(x.shape)} and dtype {x.dtype} does not fit "
                        f"the model ({first}); give samples shaped as the model input, batch first") from e


def as_labels(labels: Any, n: int, source: str = "evaluation data") -> torch.Tensor | None:
    if labels is None:
        return None
    y = torch.as_tensor(np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels))
    if y.dim() != 1 or len(y) != n:
        raise DataError(f"{source}: 'labels' has shape {tuple(y.shape)}, expected ({n},) (one per sample)")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise DataError(f"{source}: 'labels' has dtype {y.dtype}; give integer class ids")
    return y.long()
