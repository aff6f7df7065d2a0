"""Quantization (DESIGN §5): configs, brevitas quant layers, the gate precision policy, the QuantPlan.

Stage: quantize. Input: a float model, a ``QuantConfig`` and its ``GateMap``. Output: a fake-quant
copy (``quantize``) and, after calibration, the ``QuantPlan`` hand-off (``plan_from``). The torch /
brevitas parts load on first use, so reading a plan or a config stays torch-free.
"""

from __future__ import annotations

from typing import Any

from edgegate.quantize.config import CalibrationMode, GatePrecision, Observer, QuantConfig, Scheme
from edgegate.quantize.plan import Flavor, LayerKind, LayerQuant, QuantPlan

_LAZY = {
    "quantize": "edgegate.quantize.apply",
    "plan_from": "edgegate.quantize.apply",
    "float_layers": "edgegate.quantize.apply",
    "kept_float": "edgegate.quantize.apply",
    "decision_layers": "edgegate.quantize.policy",
    "register_decision_layers": "edgegate.quantize.policy",
}

__all__ = ["CalibrationMode", "Flavor", "GatePrecision", "LayerKind", "LayerQuant", "Observer", "QuantConfig",
           "QuantPlan", "Scheme", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgegate.quantize' has no attribute {name!r}")
