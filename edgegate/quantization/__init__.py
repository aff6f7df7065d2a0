"""Quantization (DESIGN §5): configs, brevitas quant layers, the gate precision policy, the QuantPlan.

Stage: quantize. Input: a float model, a ``QuantConfig`` and its ``GateMap``. Output: a fake-quant
copy (``quantize``) and, after calibration, the ``QuantPlan`` hand-off (``plan_from``). The torch /
brevitas parts load on first use, so reading a plan or a config stays torch-free.
"""

from __future__ import annotations

from typing import Any

from edgegate.quantization.config import CalibrationMode, GatePrecision, Observer, QuantConfig
from edgegate.quantization.plan import LayerKind, LayerQuant, QdqForm, QuantPlan
from edgegate.schemes import QuantScheme

_LAZY = {
    "quantize": "edgegate.quantization.apply",
    "plan_from": "edgegate.quantization.apply",
    "float_layers": "edgegate.quantization.apply",
    "kept_float": "edgegate.quantization.apply",
    "decision_layers": "edgegate.quantization.policy",
    "register_decision_layers": "edgegate.quantization.policy",
}

__all__ = ["CalibrationMode", "QdqForm", "GatePrecision", "LayerKind", "LayerQuant", "Observer", "QuantConfig",
           "QuantPlan", "QuantScheme", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgegate.quantization' has no attribute {name!r}")
