"""Quantization options: one frozen dataclass, torch-free so manifests and the CLI can read it.

Stage: configuration of calibrate / quantize (DESIGN §5). Input: user choices (CLI flags
``--quant int8 --observer … --gate-precision … --calibration …``). Output: a validated
:class:`QuantConfig`, recorded in the bundle manifest through :meth:`QuantConfig.to_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

from edgegate.errors import EdgegateError
from edgegate.quantization.plan import QdqForm
from edgegate.schemes import QuantScheme

DEFAULT_FIDELITY_TARGET = 0.995  # every gate agrees with the float model on >= 99.5% of its decisions


class Observer(StrEnum):
    """How an activation quantizer turns the calibration activations into a range."""

    MINMAX = "minmax"  # full observed range: no clipping, coarsest steps
    PERCENTILE = "percentile"  # 99.99th percentile (and 0.01th for asymmetric): clips rare outliers
    MSE = "mse"  # range minimizing the quantization MSE (slowest)


class GatePrecision(StrEnum):
    FLOAT = "float"  # gate decision layers (routers, exit heads, predictors) stay fp32
    INT8 = "int8"  # gate decision layers are quantized like every other layer


class CalibrationMode(StrEnum):
    GATE_AWARE = "gate_aware"  # path-conditional statistics, coverage augmentation, threshold re-tuning
    NAIVE = "naive"  # baseline: every quantizer sees all calibration data, gates ignored


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how to calibrate it. Strings are accepted for every enum field.

    ``gate_precision=None`` resolves to ``float`` for gate-aware calibration and ``int8`` for the
    naive baseline (gate-unaware PTQ quantizes every layer); give it explicitly to ablate.
    ``min_coverage``: calibration rows (samples for convs, tokens for linears) each quantizer should see;
    below it, gate-aware calibration augments coverage for calibration only (``augment``).
    ``retune_thresholds``: refit early-exit thresholds on the quantized model (gate-aware only).
    ``bias_correction``: remove each layer's mean output error on the calibration rows that reach it
    (both modes: the naive baseline gets it too, on all rows, so the comparison stays fair).
    ``a16_layers``: Linear layers whose input is quantized to 16 bits (A16W8; weights stay int8).
    ``float_layers``: Linear/Conv layers kept in float (beyond the gate precision policy's).
    ``fidelity_target``: gate-aware only; the agreement every gate must keep with the float model (exit
    agreement, top-k set and top-1 expert agreement, 1 - mask Hamming distance; top-1 agreement for a
    model whose only gates are soft). Calibration tries its means in order of cost and keeps the cheapest
    that meets it (``edgegate.calibration.search``); 0 turns the search off (one calibration as configured).
    ``max_promoted_layers``: how many layers feeding a failing gate the search may move to A16W8 or float.
    """

    scheme: QuantScheme = QuantScheme.INT8
    observer: Observer = Observer.PERCENTILE
    qdq_form: QdqForm = QdqForm.ASYMMETRIC
    gate_precision: GatePrecision | None = None
    calibration: CalibrationMode = CalibrationMode.GATE_AWARE
    min_coverage: int = 32
    augment: bool = True
    retune_thresholds: bool = True
    bias_correction: bool = True
    a16_layers: tuple[str, ...] = ()
    float_layers: tuple[str, ...] = ()
    fidelity_target: float = DEFAULT_FIDELITY_TARGET
    max_promoted_layers: int = 4

    def __post_init__(self) -> None:
        for name, enum in (("scheme", QuantScheme), ("observer", Observer), ("qdq_form", QdqForm),
                           ("calibration", CalibrationMode), ("gate_precision", GatePrecision)):
            value = getattr(self, name)
            if value is None and name == "gate_precision":
                continue
            try:
                object.__setattr__(self, name, enum(value))
            except ValueError:
                raise EdgegateError(f"QuantConfig: {name}={value!r} is unknown; use one of "
                                    f"{', '.join(e.value for e in enum)}") from None
        if self.scheme != QuantScheme.INT8:
            raise EdgegateError(f"QuantConfig: scheme {self.scheme} is not supported yet; use int8")
        object.__setattr__(self, "a16_layers", tuple(self.a16_layers))
        object.__setattr__(self, "float_layers", tuple(self.float_layers))
        both = sorted(set(self.a16_layers) & set(self.float_layers))
        if both:
            raise EdgegateError(f"QuantConfig: layer {both[0]} is in both a16_layers and float_layers; give it one")
        if not 0.0 <= float(self.fidelity_target) <= 1.0:
            raise EdgegateError(f"QuantConfig: fidelity_target={self.fidelity_target} must be in [0, 1] "
                                "(e.g. 0.995; 0 turns the search off)")
        if int(self.max_promoted_layers) < 0:
            raise EdgegateError(f"QuantConfig: max_promoted_layers={self.max_promoted_layers} must be >= 0")
        if int(self.min_coverage) < 1:
            raise EdgegateError(f"QuantConfig: min_coverage={self.min_coverage} must be >= 1 calibration row")

    @property
    def gate_aware(self) -> bool:
        return self.calibration == CalibrationMode.GATE_AWARE

    @property
    def gates_in_float(self) -> bool:
        """Whether the gate precision policy keeps gate decision layers in float."""
        if self.gate_precision is None:
            return self.gate_aware
        return self.gate_precision == GatePrecision.FLOAT

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, StrEnum) else list(v) if isinstance(v, tuple) else v
        out["gate_precision"] = str(GatePrecision.FLOAT if self.gates_in_float else GatePrecision.INT8)
        return out
