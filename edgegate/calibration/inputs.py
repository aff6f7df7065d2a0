"""Checking calibration / evaluation data before any work is done.

Stage: calibration input. Input: the model's inputs, batch first: one numpy array or torch tensor for
a single-input model, or several (a tuple in the model's argument order, a dict keyed by input name,
:class:`Inputs`), optionally labels and the model's :class:`TensorSpec` per input. Output:
:class:`Inputs` of torch tensors, or a :class:`DataError` naming the tensor and saying what to fix
(empty, NaN/Inf, dtype, shape, sample counts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from edgegate.data import Inputs, TensorSpec, validate_inputs
from edgegate.errors import DataError

Specs = TensorSpec | Sequence[TensorSpec] | None


def spec_list(specs: Specs) -> list[TensorSpec] | None:
    """``input_spec`` arguments as a list: one TensorSpec (a single-input model), several, or None."""
    if specs is None or isinstance(specs, TensorSpec):
        return None if specs is None else [specs]
    return list(specs)


def as_inputs(data: Any, model: nn.Module, specs: Specs = None, source: str = "calibration data") -> Inputs:
    """``data`` as :class:`Inputs` of tensors, each checked like `as_input`, with one sample count.

    Names come from ``specs`` (or the model's ``input_names``, or ``input``); a tuple is taken in that
    order, a dict or Inputs by name. (A list is not several inputs: it is refused like any non-array.)
    """
    given = spec_list(specs)
    names = [s.name for s in given] if given else [str(n) for n in getattr(model, "input_names", None) or ()]
    if not names:
        names = [f"input_{i}" for i in range(len(data))] if isinstance(data, tuple) else ["input"]
    inputs = Inputs.of(data, names) if isinstance(data, (tuple, dict, Inputs)) else Inputs({names[0]: data})
    if given is not None:
        missing = [n for n in names if n not in inputs.arrays]
        extra = [n for n in inputs.names if n not in names]
        if missing:
            raise DataError(f"{source}: missing input {missing[0]!r}; the model takes {', '.join(names)}")
        if extra:
            raise DataError(f"{source}: unexpected input {extra[0]!r}; the model takes {', '.join(names)}")
        inputs = Inputs({n: inputs.arrays[n] for n in names})
    by_name = {s.name: s for s in given or ()}
    out = Inputs({n: as_input(v, n, by_name.get(n), source) for n, v in inputs.arrays.items()})
    counts = {n: int(v.shape[0]) for n, v in out.arrays.items()}
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{k}={v}" for k, v in counts.items())
        raise DataError(f"{source}: inputs have different sample counts ({shown}); give every input the same N")
    return out


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


def check_fits(model: nn.Module, x: Inputs | torch.Tensor, name: str | None = None,
               source: str = "calibration data") -> None:
    """Run the model on two samples: a shape or dtype the model cannot take becomes a DataError."""
    x = Inputs.of(x, [name or "input"])
    try:
        with torch.no_grad():
            x[:2].run(model)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shown = ", ".join(f"{k!r} of shape {tuple(v.shape)} and dtype {v.dtype}" for k, v in x.arrays.items())
        what = "input" if len(x.arrays) == 1 else "inputs"
        raise DataError(f"{source}: {what} {shown} do{'es' if what == 'input' else ''} not fit the model "
                        f"({first[:200]}); give samples shaped as the model {what}, batch first") from e


def as_labels(labels: Any, n: int, source: str = "evaluation data") -> torch.Tensor | None:
    if labels is None:
        return None
    y = torch.as_tensor(np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels))
    if y.dim() != 1 or len(y) != n:
        raise DataError(f"{source}: 'labels' has shape {tuple(y.shape)}, expected ({n},) (one per sample)")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise DataError(f"{source}: 'labels' has dtype {y.dtype}; give integer class ids")
    return y.long()
