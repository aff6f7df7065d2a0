"""What calibration did and measured, for the bundle manifest.

Stage: calibration output (DESIGN §1 ``CalibrationRecord``). Input: the results of a ``calibrate``
run. Output: frozen records with ``to_dict()`` (JSON-able, no arrays); the :class:`QuantPlan` with
its arrays stays reachable as ``record.plan`` for the ONNX lowering.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from edgegate.quantization.config import QuantConfig
from edgegate.quantization.plan import QuantPlan


@dataclass(frozen=True)
class Coverage:
    """Calibration rows per quantized layer, per early-exit stage (by net path), per router slot
    (by MoE path; FFN experts first, then zero / copy / constant slots) and per ACM learner (by ACM path)."""

    layers: dict[str, int] = field(default_factory=dict)
    stages: dict[str, list[int]] = field(default_factory=dict)
    slots: dict[str, list[int]] = field(default_factory=dict)
    learners: dict[str, list[int]] = field(default_factory=dict)

    def below(self, min_rows: int) -> list[str]:
        """Layers with fewer than ``min_rows`` rows."""
        return [p for p, n in self.layers.items() if n < min_rows]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layers": dict(self.layers), "stages": {p: list(v) for p, v in self.stages.items()},
                               "slots": {p: list(v) for p, v in self.slots.items()}}
        if self.learners:  # models with ACMs only
            out["learners"] = {p: list(v) for p, v in self.learners.items()}
        return out


@dataclass(frozen=True)
class Augmentation:
    """A calibration-only change of the gating that raised coverage (restored afterwards).

    ``kind="exit_threshold"``: threshold ``index`` of net ``gate`` raised from ``before`` to ``after``;
    rows = samples continuing past that exit. ``kind="top_k"``: router ``gate`` widened from k=``before``
    to ``after`` (extra routes weigh 0); rows = tokens of the least covered quantized expert.
    ``kind="learner_count"``: ACM ``gate``'s per-token learner counts widened by ``after`` (the extra
    learners weigh 0); rows = tokens of the least covered quantized learner.
    """

    gate: str
    kind: str
    index: int | None
    before: float
    after: float
    rows_before: int
    rows_after: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Fallback:
    """A layer the gated calibration left without rows. ``action="naive"``: calibrated on its inputs
    under naive gating (all calibration data); ``"float"``: never executed at all, left in float."""

    layer: str
    action: str
    rows: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CalibrationRecord:
    """One calibration run. ``coverage``: rows under the deployed gating (float model);
    ``calibrated``: rows each quantizer actually saw (after augmentation and fallbacks);
    ``thresholds``: per early-exit net, ``{"before": [...], "after": [...]}`` (re-tuned; set ``after``
    on the float model before export); ``float_layers``: layers kept float, with the reason;
    ``bias_corrections``: largest bias change per corrected layer (the plan holds the corrected biases);
    ``a16``: layers promoted to A16W8 for exit fidelity, with the agreements before and after;
    ``fidelity``: attach ``measure_fidelity`` results with :meth:`with_fidelity`."""

    config: QuantConfig
    samples: int
    coverage: Coverage
    calibrated: Coverage
    augmentation: tuple[Augmentation, ...]
    fallbacks: tuple[Fallback, ...]
    thresholds: dict[str, dict[str, list[float]]]
    float_layers: dict[str, str]
    plan: QuantPlan
    bias_corrections: dict[str, float] = field(default_factory=dict)
    fidelity: dict[str, Any] | None = None
    a16: dict[str, Any] | None = None  # mixed precision chosen for exit fidelity (see ``promote_a16``)

    def with_fidelity(self, fidelity: dict[str, Any]) -> CalibrationRecord:
        return dataclasses.replace(self, fidelity=fidelity)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "samples": self.samples,
            "coverage": self.coverage.to_dict(),
            "calibrated": self.calibrated.to_dict(),
            "augmentation": [a.to_dict() for a in self.augmentation],
            "fallbacks": [f.to_dict() for f in self.fallbacks],
            "thresholds": {p: {k: list(v) for k, v in d.items()} for p, d in self.thresholds.items()},
            "float_layers": dict(self.float_layers),
            "bias_corrections": dict(self.bias_corrections),
            "plan": self.plan.to_dict(),
            "fidelity": self.fidelity,
            "a16": self.a16,
        }
