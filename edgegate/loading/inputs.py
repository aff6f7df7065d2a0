"""Model input specs: what a model takes, recorded in its file or given as ``--input NAME:SHAPE[:DTYPE]``.

Stage: load (the model's interface, before anything runs it). Input: the spec a loader returned (an
edgegate checkpoint's ``meta.inputs``, a Hugging Face folder's defaults) and the user's ``--input``
strings. Output: the model's inputs as a tuple of :class:`TensorSpec` (name, per-sample shape, dtype),
in the order its ``forward`` takes them. Torch-free.

``--input`` shapes are written batch first (``x:1x3x224x224``); the batch itself is not part of the
spec: an export has a dynamic batch unless ``--batch`` fixes it. When given, ``--input`` lists every
input and replaces what the file records.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from edgegate.data import TensorSpec
from edgegate.errors import ExportError

DEFAULT_DTYPE = "float32"
# numpy names of the dtypes a model input may have (ONNX and every target take these).
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
MAX_DIMS = 8
MAX_DIM = 1 << 24
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SYNTAX = "NAME:SHAPE[:DTYPE], e.g. x:1x3x224x224 or input_ids:1x128:int64"


def parse_input(text: str) -> TensorSpec:
    """One ``--input`` value as a TensorSpec (per-sample shape: the leading batch dimension dropped)."""
    shown = text if len(text) <= 80 else text[:77] + "..."
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ExportError(f"--input {shown!r} is not {SYNTAX}")
    name, shape_text = parts[0].strip(), parts[1].strip()
    dtype = parts[2].strip() if len(parts) == 3 else DEFAULT_DTYPE
    if not _NAME.fullmatch(name):
        raise ExportError(f"--input {shown!r}: name {name!r} must be an identifier (letters, digits, _); "
                          f"expected {SYNTAX}")
    dims = shape_text.lower().split("x")
    if not all(d.isascii() and d.isdigit() for d in dims):
        raise ExportError(f"--input {shown!r}: shape {shape_text!r} must be sizes joined by 'x', batch first "
                          "(e.g. 1x3x224x224)")
    sizes = [int(d) for d in dims]
    if len(sizes) > MAX_DIMS or any(not 1 <= s <= MAX_DIM for s in sizes):
        raise ExportError(f"--input {shown!r}: every size must be 1..{MAX_DIM} and at most {MAX_DIMS} "
                          "dimensions (batch first)")
    if dtype not in DTYPES:
        raise ExportError(f"--input {shown!r}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return TensorSpec(name, tuple(sizes[1:]), dtype)


def parse_inputs(texts: Sequence[str]) -> tuple[TensorSpec, ...]:
    """Every ``--input``; a name given twice is an error."""
    specs = tuple(parse_input(t) for t in texts)
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ExportError(f"--input {twice[0]} is given twice; give each model input once")
    return specs


def recorded_inputs(spec: Mapping[str, Any]) -> tuple[TensorSpec, ...]:
    """The inputs a loaded model's spec records (``meta.inputs``), or () when it records none."""
    meta = spec.get("meta") or {}
    found = meta.get("inputs") if isinstance(meta, Mapping) else None
    if not found:
        return ()
    try:
        return tuple(TensorSpec(str(i["name"]), tuple(None if d is None else int(d) for d in i["shape"]),
                                str(i["dtype"])) for i in found)
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"the model's recorded inputs (meta.inputs) are malformed ({e}); "
                          f"give them with --input {SYNTAX}") from e


def model_inputs(spec: Mapping[str, Any], given: Sequence[TensorSpec] = ()) -> tuple[TensorSpec, ...]:
    """The model's inputs: ``given`` (from ``--input``) when any, else what the file records."""
    if given:
        return tuple(given)
    found = recorded_inputs(spec)
    if not found:
        raise ExportError(f"the model file does not record its inputs: pass --input {SYNTAX} (repeat it for "
                          "each input, in forward's order), or save it with edgegate.save(model, path, "
                          "meta={'inputs': [{'name': ..., 'shape': [...], 'dtype': ...}]})")
    return found


def value_range(spec: Mapping[str, Any], name: str) -> tuple[int, int]:
    """[low, high) for random integer samples of input ``name``: its recorded ``range``, else
    ``[0, vocab_size)`` of the model's meta, else [0, 2)."""
    meta = spec.get("meta") or {}
    for i in meta.get("inputs") or ():
        if isinstance(i, Mapping) and i.get("name") == name and isinstance(i.get("range"), (list, tuple)):
            low, high = i["range"]
            return int(low), int(high)
    return 0, int(meta.get("vocab_size", 2))


def single_input(spec: Mapping[str, Any]) -> TensorSpec:
    """The model's one input (name, per-sample shape, dtype) from its checkpoint metadata; a model with
    several inputs is an ExportError naming them."""
    inputs = model_inputs(spec)
    if len(inputs) != 1:
        raise ExportError(f"the model takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                          "this needs its one input")
    return inputs[0]
