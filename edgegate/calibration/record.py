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


class _Fields:
    """A record whose fields are JSON-able as they are: ``to_dict`` is ``dataclasses.asdict``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Augmentation(_Fields):
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


@dataclass(frozen=True)
class Fallback(_Fields):
    """A layer the gated calibration left without rows. ``action="naive"``: calibrated on its inputs
    under naive gating (all calibration data); ``"float"``: never executed at all, left in float."""

    layer: str
    action: str
    rows: int
    reason: str


@dataclass(frozen=True)
class Estimate:
    """One gate metric of one try on the calibration rows: ``value`` as counted (an agreement, or a mask
    Hamming distance), ``expected`` from the decision margins (``calibration.margins``), ``se`` the
    bootstrap standard error of ``expected``; ``rows``: decisions the metric is counted over."""

    gate: str
    metric: str
    value: float
    expected: float
    se: float
    rows: int

    def to_dict(self) -> dict[str, Any]:
        return {"gate": self.gate, "metric": self.metric, "value": round(self.value, 6),
                "expected": round(self.expected, 6), "se": round(self.se, 6), "rows": self.rows}


@dataclass(frozen=True)
class Try:
    """One calibration the fidelity search ran: the means it added (``means``: a ``search.Means`` value),
    the settings that define it, what it measured, and whether it met the target. ``margin``: the
    worst metric's distance to the target, conservatively (negative: missed)."""

    means: str
    settings: dict[str, Any]
    measured: tuple[Estimate, ...]
    margin: float
    passed: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"means": self.means, "settings": dict(self.settings), "measured": [e.to_dict() for e in self.measured],
                "margin": round(self.margin, 6), "passed": self.passed, "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class SearchRecord:
    """The fidelity-target search: the target, the metrics it applied to, every try in the order run
    (cheapest first), the one chosen (the first that passed, else the best), and the one-line warning
    when none passed."""

    target: float
    metrics: tuple[str, ...]
    rows: int
    tries: tuple[Try, ...]
    chosen: int
    warning: str | None = None

    @property
    def met(self) -> bool:
        return self.tries[self.chosen].passed

    def to_dict(self) -> dict[str, Any]:
        chosen = self.tries[self.chosen]
        return {"target": self.target, "metrics": list(self.metrics), "rows": self.rows, "met": self.met,
                "chosen": {"try": self.chosen, "means": chosen.means, **chosen.settings},
                "warning": self.warning, "tries": [t.to_dict() for t in self.tries]}


@dataclass(frozen=True)
class CalibrationRecord:
    """One calibration run. ``coverage``: rows under the deployed gating (float model);
    ``calibrated``: rows each quantizer actually saw (after augmentation and fallbacks);
    ``thresholds``: per early-exit net, ``{"before": [...], "after": [...]}`` (re-tuned; set ``after``
    on the float model before export); ``float_layers``: layers kept float, with the reason;
    ``bias_corrections``: largest bias change per corrected layer (the plan holds the corrected biases);
    ``a16``: layers promoted to A16W8 for gate fidelity, with the agreement before and after;
    ``search``: the fidelity-target search that chose this calibration (None when it did not run);
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
    a16: dict[str, Any] | None = None  # A16W8 layers chosen for gate fidelity (see ``calibration.search``)
    search: SearchRecord | None = None

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
            "search": None if self.search is None else self.search.to_dict(),
        }
