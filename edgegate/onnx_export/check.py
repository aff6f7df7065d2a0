"""``onnx.checker.check_model(full_check=True)`` of a ModelProto through a file: one copy of the weights fewer.

Input: a ModelProto. Output: nothing; the checker's own exceptions (``onnx.checker.ValidationError``,
``onnx.shape_inference.InferenceError``) as ``check_model`` raises them. ``check_model`` of a proto holds its
serialized bytes, the model parsed from them and that model's copy for shape inference at once, beside the
caller's proto (950 MB for a 59M-parameter float export); of a file, the last two only (the bytes are written
and freed first).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from edgegate.fs import scratch_write


def check_proto(model: onnx.ModelProto, workdir: str | Path | None = None) -> None:
    """The full check of ``model`` (no external data), through a temporary file in ``workdir`` (default: the
    system's temporary directory)."""
    with tempfile.TemporaryDirectory(prefix="edgegate-check-", dir=workdir) as tmp:
        path = Path(tmp) / "model.onnx"
        with scratch_write(path):
            onnx.save_model(model, str(path))
        onnx.checker.check_model(str(path), full_check=True)
