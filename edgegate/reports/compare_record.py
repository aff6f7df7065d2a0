"""Stage 8, compare: the records a comparison produces and their versioned JSON form (no torch, no onnx).

Input: what `edgegate.comparison.compare` measured. Output: `Row` (one model variant) and `CompareReport`
(``to_dict``: the ``"format": "edgegate.compare"`` JSON, README, "Report formats"), which ``reports.compare_text``
and ``reports.html`` render.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from edgegate.reports.stats import LatencyStats, plain

# The note (in the report's notes, so also in its JSON and HTML) naming the bundles whose recorded fidelity was
# measured on their calibration rows; the text repeats it under the table.
CALIBRATION_ROWS_NOTE = ("gate fidelity recorded at export on the calibration rows, not held-out data "
                         "(exported without --holdout)")
FORMAT = "edgegate.compare"
# v4 added ``skip_sweep`` and the ACM / skip columns; v3 ``intervals`` (rows + Wilson 95%); v2 ``measured_on``
# and the rows' ``device``; README, "Report formats"
FORMAT_VERSION = 4
NOTES = (
    "per-layer SQNR: float torch module output vs the same layer in the bundle's model.onnx on ONNX Runtime "
    "CPU (layer output added as a graph output), on the rows that reach the layer under the float model's "
    "gating (samples not exited before its stage, tokens routed to its expert)",
    "exit-threshold sweep: one threshold for all exits; float in torch, bundle = its model.onnx on ONNX Runtime "
    "with the ExitDecision threshold initializers replaced",
    "mask Hamming (channel/threshold gates) is the value recorded at export on held-out data: masks are not "
    "outputs of the deployed graph",
    "latency: bundles = `edgegate bench` on their target (batch as exported, else 1); float = torch eager, batch 1",
    "skip sweep (bundles exported with --moe-skip): one threshold tau for every router at multiples of the deployed "
    "one, alpha_l as calibrated; float in torch, bundle = its model.onnx on ONNX Runtime with TopKGate's "
    "skip_threshold replaced; skip rate = routed slots given weight 0; such a bundle's agreements are counted "
    "against the float model skipping as its manifest records",
    "intervals: Wilson 95% score intervals over the rows each rate was counted on (samples; tokens for routes; "
    "samples, not bits, for a mask Hamming distance recorded at export, which makes that interval conservative)",
)
DEVICE_NOTE = ("latency of a row with a device: measured on that device by its agent (`--device`), accuracy and "
               "fidelity here; float = torch eager here")


@dataclasses.dataclass(frozen=True)
class Row:
    """One variant of the model. ``status`` "skipped" rows carry only ``note`` and ``recorded``."""

    name: str
    kind: str  # float | bundle | baseline
    path: str | None
    target: str | None
    quant: str | None
    calibration: str | None
    status: str  # ok | skipped
    note: str = ""
    metrics: dict[str, float | None] = dataclasses.field(default_factory=dict)
    recorded: dict[str, Any] = dataclasses.field(default_factory=dict)  # fidelity from the manifest
    latency: LatencyStats | None = None
    batch: int | None = None
    layer_sqnr_db: dict[str, float] = dataclasses.field(default_factory=dict)
    sweep: tuple[dict[str, float], ...] = ()  # {threshold, accuracy, mean_exit_depth}
    skip_sweep: tuple[dict[str, float], ...] = ()  # {tau, skip_rate, accuracy}: MoE expert skipping
    histograms: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    device: dict[str, Any] | None = None  # the agent that measured ``latency`` ({name, url}); None: here
    intervals: dict[str, dict[str, float | int]] = dataclasses.field(default_factory=dict)  # metric -> Wilson 95%
    latencies_ms: tuple[float, ...] = dataclasses.field(default=(), repr=False)  # for plots; not in JSON


@dataclasses.dataclass(frozen=True)
class CompareReport:
    model: dict[str, Any]
    data: dict[str, Any]
    rows: tuple[Row, ...]
    notes: tuple[str, ...] = NOTES

    def to_dict(self) -> dict[str, Any]:
        d = plain(dataclasses.asdict(self))
        for row in d["rows"]:
            row.pop("latencies_ms")
        return {"format": FORMAT, "version": FORMAT_VERSION, **d}
