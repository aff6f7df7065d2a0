"""What an export starts from: a model file or folder on disk, or an ``nn.Module`` given from Python.

Stage: load (the front of ``pipeline.run_export``). Input: a path or an ``nn.Module``, the user's
``--input`` specs and, from Python, example inputs (a tensor, a tuple in forward's order, or a dict
keyed by input name). Output: `Source`: the `LoadedModel`, the model's input specs (in forward's
order) and the example inputs as numpy :class:`Inputs` (or None). Formats that load but cannot be
exported (TorchScript, ``.pt2``) are refused here, before any of their code runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgegate.data import Inputs, TensorSpec
from edgegate.errors import DataError, ExportError
from edgegate.loading.build import LoadedModel, load
from edgegate.loading.detect import NOT_EXPORTABLE, ModelFormat, detect_format
from edgegate.loading.inputs import model_inputs, recorded_inputs


@dataclasses.dataclass(frozen=True)
class Source:
    loaded: LoadedModel
    inputs: tuple[TensorSpec, ...]  # the model's inputs, in forward's order
    examples: Inputs | None = None  # numpy arrays, batch first (from Python's example_inputs)


def open_source(model: Any, *, trust_model: bool = False, model_class: str | None = None,
                inputs: Sequence[TensorSpec] = (), example_inputs: Any = None) -> Source:
    """Load `model` (a path or an nn.Module) for export; `inputs` (``--input``) override what it records."""
    given = tuple(inputs)
    if isinstance(example_inputs, dict) and not given:  # named examples name the inputs (an HF folder's too)
        given = specs_of(name_examples(None, example_inputs))
    if isinstance(model, torch.nn.Module):
        loaded = from_module(model)
    elif isinstance(model, (str, os.PathLike)):
        fmt = detect_format(model)
        if fmt in NOT_EXPORTABLE:
            raise ExportError(f"cannot export {model}: {NOT_EXPORTABLE[fmt]}")
        loaded = load(model, trust_model=trust_model, model_class=model_class, inputs=given)
    else:
        raise ExportError(f"edgegate.export takes a model path or a torch.nn.Module, not {type(model).__name__}")
    examples = None
    if example_inputs is not None:
        examples = name_examples(loaded.module, example_inputs, [s.name for s in given] or None)
        if not given:
            given = specs_of(examples, recorded_inputs(loaded.spec))
    return Source(loaded, model_inputs(loaded.spec, given), examples)


def from_module(module: Any) -> LoadedModel:
    """An in-memory module as a LoadedModel: its class path, no file, sha256 of its state_dict."""
    cls = type(module)
    spec = {"class": f"{cls.__module__}:{cls.__qualname__}", "config": None, "meta": {}}
    return LoadedModel(module=module, format=ModelFormat.MODULE, spec=spec, sha256=state_dict_sha256(module),
                       path=None)


def state_dict_sha256(module: Any) -> str:
    """sha256 over the state_dict, entry by entry in name order: name, dtype, shape, then the raw bytes."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        a = t.detach().cpu().contiguous()
        h.update(f"{name}|{a.dtype}|{list(a.shape)}\n".encode())
        h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return h.hexdigest()


def name_examples(module: Any, example: Any, names: Sequence[str] | None = None) -> Inputs:
    """Example inputs as numpy Inputs named by `names`, else by the module's ``input_names`` or the
    parameters of its ``forward`` (a tensor is the first input, a tuple is taken in order)."""
    if isinstance(example, dict):
        inputs = Inputs(dict(example))
    else:
        args = tuple(example) if isinstance(example, tuple) else (example,)
        want, required = (list(names), len(names)) if names else _forward_names(module, len(args))
        if not required <= len(args) <= len(want):
            takes = f"{required}" if required == len(want) else f"{required} to {len(want)}"
            raise DataError(f"{len(args)} example input(s) given for a model that takes {takes} "
                            f"({', '.join(want)}); give one per input, or a dict keyed by input name")
        inputs = Inputs(dict(zip(want, args, strict=False)))
    return inputs.map(_as_array)


def specs_of(examples: Inputs, recorded: Sequence[TensorSpec] = ()) -> tuple[TensorSpec, ...]:
    """Input specs read off example arrays (per-sample shape and dtype); a recorded spec of the same name
    and shape keeps its record (a dynamic dimension stays dynamic)."""
    by_name = {s.name: s for s in recorded}
    out = []
    for name, a in examples.arrays.items():
        rec = by_name.get(name)
        fits = rec is not None and len(rec.shape) == a.ndim - 1 and all(
            d is None or d == s for d, s in zip(rec.shape, a.shape[1:], strict=True))
        out.append(rec if fits else TensorSpec(name, tuple(int(d) for d in a.shape[1:]), str(a.dtype)))
    return tuple(out)


def _forward_names(module: Any, n: int) -> tuple[list[str], int]:
    """(input names, how many are required) from the module's ``input_names`` or its ``forward``."""
    declared = getattr(module, "input_names", None)
    if declared:
        return [str(x) for x in declared], 1
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or C++ forward: no Python signature
        return [f"input_{i}" for i in range(n)] if n > 1 else ["input"], n
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in positional]
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        names += [f"input_{i}" for i in range(len(names), n)]
    return names, sum(p.default is p.empty for p in positional)


def _as_array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return np.ascontiguousarray(x.detach().cpu().numpy())
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x)
    raise DataError(f"example inputs must be torch tensors or numpy arrays, not {type(x).__name__}")


def describe(loaded: LoadedModel) -> dict[str, Any]:
    """The manifest's ``source`` entry: file name (None for a module), sha256, format."""
    return {"file": None if loaded.path is None else Path(loaded.path).name, "sha256": loaded.sha256,
            "format": str(loaded.format)}
