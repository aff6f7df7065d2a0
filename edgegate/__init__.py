"""edgegate: deploy conditional-computation networks to edge targets.

The public API, one function per pipeline stage (DESIGN §1), resolved lazily so that ``import
edgegate`` stays cheap and the runtime side (``bench``, bundles) never pulls in torch or onnx:

    load -> find_gates -> calibrate / quantize -> export_onnx -> compile -> bench / compare

``export`` runs the whole chain from a model file, a Hugging Face folder or an ``nn.Module`` with
example inputs to a bundle directory (what ``edgegate export`` does).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.1.0"

# onnxruntime writes telemetry (a session file in $TMPDIR) when imported; opt out unless the user opted in.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

_API = {
    "load": ("edgegate.loading", "load"),
    "save": ("edgegate.loading", "save"),
    "find_gates": ("edgegate.gates", "find_gates"),
    "calibrate": ("edgegate.calibration", "calibrate"),
    "quantize": ("edgegate.quantization.apply", "quantize"),
    "export_onnx": ("edgegate.onnx_export.torch_export", "export_onnx"),
    "compile": ("edgegate.targets", "compile_model"),
    "export": ("edgegate.pipeline", "export"),
    "read_bundle": ("edgegate.bundle", "read_bundle"),
    "bench": ("edgegate.benchmark", "bench"),
    "compare": ("edgegate.comparison", "compare"),
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attr = _API[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'edgegate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
