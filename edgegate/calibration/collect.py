"""Gate-aware calibration: drive every activation quantizer with exactly what reaches it when deployed.

Stage: calibrate (DESIGN §1, §5). Input: a float model, calibration inputs (batch first: one array
for a single-input model, or a tuple / dict / :class:`Inputs` of several), a :class:`QuantConfig` and
the model's :class:`GateMap`. Output: the calibrated fake-quant model and a :class:`CalibrationRecord`
(coverage, augmentation, fallbacks, re-tuned thresholds and the :class:`QuantPlan`).

Steps: validate the data; quantize a copy (gate precision policy); count rows under the deployed
gating (float model); plan coverage augmentation; run the quantized model's own eager forward once in
brevitas calibration mode under the calibration gating (augmented, or naive for the baseline);
calibrate layers that got no rows on their naive inputs; correct biases on the same rows; re-tune exit
thresholds; read the plan back.

The whole calibration set goes through in ONE forward: brevitas averages one statistic per call, so
a call with 3 rows would weigh as much as one with 3000 (gating makes per-layer batch sizes vary).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from edgegate.calibration.bias import correct_biases
from edgegate.calibration.gating import (
    augment_exits,
    augment_learners,
    augment_routing,
    augmented_gating,
    naive_gating,
)
from edgegate.calibration.inputs import Specs, as_inputs, check_fits
from edgegate.calibration.probe import GatedParts, Probe
from edgegate.calibration.record import CalibrationRecord, Coverage, Fallback
from edgegate.calibration.retune import retune_exit_thresholds
from edgegate.data import Inputs
from edgegate.errors import EdgegateError
from edgegate.gates import GateMap, find_gates
from edgegate.quantization.apply import float_layers, kept_float, plan_from, quantize, unquantize_layer
from edgegate.quantization.config import QuantConfig
from edgegate.quantization.plan import LayerKind

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*fast_hadamard_transform.*")
    from brevitas.graph.calibrate import calibration_mode

log = logging.getLogger(__name__)


def _coverage(probe: Probe, rows: dict[str, int] | None = None) -> Coverage:
    return Coverage(dict(probe.rows) if rows is None else rows, {p: list(v) for p, v in probe.stage_rows.items()},
                    {p: list(v) for p, v in probe.slot_rows.items()},
                    {p: list(v) for p, v in probe.learner_rows.items()})


def _fallbacks(ref: nn.Module, qmodel: nn.Module, x: Inputs, fparts: GatedParts,
               swapped: dict[str, nn.Module], rows: dict[str, int]) -> list[Fallback]:
    """Calibrate each quantizer that got no rows on its inputs under naive gating (call it inside the
    calibration context). A layer that never runs even then is put back in float."""
    empty = [p for p, n in rows.items() if n == 0]
    if not empty:
        return []
    with naive_gating(fparts), Probe(ref, empty, fparts, keep_inputs=empty) as probe:
        x.run(ref)
    out = []
    for path in empty:
        inputs = probe.layer_input(path)
        if inputs is None:
            unquantize_layer(qmodel, path, ref.get_submodule(path))
            del swapped[path]
            out.append(Fallback(path, "float", 0, "never executed on the calibration data, even with every "
                                                  "gate open; left in float"))
            continue
        swapped[path](inputs)  # one call: brevitas averages per call
        rows[path] = probe.rows[path]
        out.append(Fallback(path, "naive", rows[path], "no calibration row reached it under the (augmented) "
                                                       "gating; calibrated on all calibration data"))
        log.warning("calibration: %s got no rows under gating; calibrated on all data instead", path)
    return out


def calibrate(model: nn.Module, data: np.ndarray | torch.Tensor | tuple | dict | Inputs,
              config: QuantConfig | None = None, gate_map: GateMap | None = None, *,
              input_spec: Specs = None) -> tuple[nn.Module, CalibrationRecord]:
    """Quantize a copy of ``model`` and calibrate it on ``data`` ([N, ...] per input: one np.ndarray or
    torch.Tensor, or several as a tuple in forward's order, a dict or Inputs keyed by input name).
    ``input_spec``: the model's TensorSpec (or one per input) to check the data against.

    Returns ``(quantized model, record)``; ``model`` itself is not modified. Raises ``DataError``
    (naming the input) for empty, NaN/Inf or ill-shaped data before any work. Gate-aware calibration
    then promotes decision-critical layers to A16W8 while exit decisions disagree with the float
    model's on more than ``1 - config.min_exit_agreement`` of the calibration samples.
    """
    config = config or QuantConfig()
    gate_map = find_gates(model) if gate_map is None else gate_map
    qmodel, record = _calibrate(model, data, config, gate_map, input_spec)
    if config.gate_aware and config.min_exit_agreement > 0 and config.max_a16_layers > 0:
        qmodel, record = promote_a16(model, data, config, gate_map, input_spec, qmodel, record)
    return qmodel, record


def promote_a16(model: nn.Module, data: Any, config: QuantConfig, gate_map: GateMap,
                input_spec: Specs, qmodel: nn.Module,
                record: CalibrationRecord) -> tuple[nn.Module, CalibrationRecord]:
    """Greedy mixed precision for exit fidelity: while the calibration samples' exit agreement is below
    the target, recalibrate with each remaining candidate (a quantized Linear in a stage before the
    last exit) at A16W8 and keep the one that agrees best; stop at the target, at ``max_a16_layers``
    or when no candidate helps. The choice and every agreement tried go into the record."""
    from edgegate.calibration.fidelity import measure_fidelity

    def agreement(q: nn.Module) -> float | None:
        return measure_fidelity(model, q, data, gate_map=gate_map, input_spec=input_spec)["summary"].get(
            "exit_agreement")

    before = agreement(qmodel)
    if before is None or before >= config.min_exit_agreement:
        return qmodel, record
    parts = GatedParts.of(model, gate_map)
    candidates = [p for p, q in record.plan.layers.items() if q.kind is LayerKind.LINEAR
                  and p not in config.a16_layers and _before_last_exit(p, parts)]
    chosen, best, tried = list(config.a16_layers), before, {}
    while best < config.min_exit_agreement and len(chosen) - len(config.a16_layers) < config.max_a16_layers:
        trial = {}
        for p in [c for c in candidates if c not in chosen]:
            cfg = dataclasses.replace(config, a16_layers=(*chosen, p))
            q, r = _calibrate(model, data, cfg, gate_map, input_spec)
            trial[p] = (agreement(q), q, r)
            tried[p] = trial[p][0]
        if not trial:
            break
        p, (value, q, r) = max(trial.items(), key=lambda kv: kv[1][0])
        if value <= best:
            break
        chosen.append(p)
        best, qmodel, record = value, q, r
    log.info("calibration: exit agreement %.4f -> %.4f with A16W8 layers %s", before, best, chosen)
    a16 = {"layers": chosen, "target": config.min_exit_agreement,
           "exit_agreement": {"before": before, "after": best}, "tried": tried}
    return qmodel, dataclasses.replace(record, a16=a16)


def _before_last_exit(path: str, parts: GatedParts) -> bool:
    """Whether ``path`` lies in a stage of an early-exit net that some exit decision follows."""
    for net_path, net in parts.exits.items():
        prefix = f"{net_path}.stages." if net_path else "stages."
        if path.startswith(prefix):
            stage = path[len(prefix):].split(".", 1)[0]
            if stage.isdigit() and int(stage) < net.n_exits - 1:
                return True
    return False


def _calibrate(model: nn.Module, data: Any, config: QuantConfig, gate_map: GateMap,
               input_spec: Specs) -> tuple[nn.Module, CalibrationRecord]:
    x = as_inputs(data, model, input_spec)
    ref = copy.deepcopy(model).eval()  # private float reference: gating is changed on it temporarily
    check_fits(ref, x)
    qmodel, swapped = quantize(ref, config, gate_map)
    fparts, qparts = GatedParts.of(ref, gate_map), GatedParts.of(qmodel, gate_map)
    paths = list(swapped)
    with torch.no_grad():
        with Probe(ref, paths, fparts) as deployed:
            x.run(ref)
        thresholds: dict[str, list[float]] = {}
        k_wide: dict[str, int] = {}
        extra: dict[str, int] = {}
        augmentation = []
        if config.gate_aware and config.augment:
            thresholds, on_exits = augment_exits(ref, x, fparts, config.min_coverage)
            k_wide, on_routes = augment_routing(ref, x, fparts, thresholds, set(paths), config.min_coverage)
            extra, on_learners = augment_learners(ref, x, fparts, thresholds, set(paths), config.min_coverage)
            augmentation = on_exits + on_routes + on_learners

        def gating() -> contextlib.AbstractContextManager:
            return augmented_gating(qparts, thresholds, k_wide, extra) if config.gate_aware else naive_gating(qparts)

        with calibration_mode(qmodel):
            with gating(), Probe(qmodel, paths, qparts) as seen:
                x.run(qmodel)
            rows = dict(seen.rows)
            fallbacks = _fallbacks(ref, qmodel, x, fparts, swapped, rows)
        rows = {p: n for p, n in rows.items() if p in swapped}
        if any(rows[p] == 0 for p in swapped):  # the invariant the fallbacks exist for; never ship a default
            raise EdgegateError(f"calibration left {[p for p in swapped if rows[p] == 0]} without data")
        corrections: dict[str, float] = {}
        if config.bias_correction:
            with gating():
                corrections = correct_biases(qmodel, x, swapped)
        below = [p for p, n in rows.items() if n < config.min_coverage]
        if below:
            log.info("calibration: %d layer(s) below min_coverage=%d rows: %s", len(below), config.min_coverage,
                     ", ".join(below))
        retuned = {}
        if config.gate_aware and config.retune_thresholds:
            retuned = retune_exit_thresholds(ref, qmodel, x, fparts, qparts)
        plan = plan_from(swapped, config.flavor, float_layers(qmodel), rows)
    reasons = kept_float(ref, config, gate_map)
    reasons.update({f.layer: f.reason for f in fallbacks if f.action == "float"})
    record = CalibrationRecord(
        config=config, samples=len(x), coverage=_coverage(deployed),
        calibrated=_coverage(seen, rows),
        augmentation=tuple(augmentation), fallbacks=tuple(fallbacks), thresholds=retuned,
        bias_corrections=corrections,
        float_layers={p: reasons.get(p, "") for p in plan.float_layers}, plan=plan)
    return qmodel, record
