"""Gate-aware calibration: drive every activation quantizer with exactly what reaches it when deployed.

Stage: calibrate (DESIGN §1, §5). Input: a float model, calibration inputs (batch first: one array
for a single-input model, or a tuple / dict / :class:`Inputs` of several), a :class:`QuantConfig` and
the model's :class:`GateMap`. Output: one calibrated fake-quant model and its :class:`CalibrationRecord`
(coverage, augmentation, fallbacks, re-tuned thresholds and the :class:`QuantPlan`).

Steps: validate the data; quantize a copy (gate precision policy); count rows under the deployed
gating (float model); plan coverage augmentation; run the quantized model's own eager forward once in
brevitas calibration mode under the calibration gating (augmented, or naive for the baseline);
calibrate layers that got no rows on their naive inputs; correct biases on the same rows; re-tune exit
thresholds; read the plan back. ``observe`` does the first part and ``finish`` the rest, so the
fidelity-target search (``calibration.search``, where ``calibrate`` lives) can finish one observation
with and without bias correction and re-tuning (in place, between `finished_state` and `restore_state`);
``calibrate_once`` is both in a row.

The whole calibration set goes through in ONE forward: brevitas averages one statistic per call, so
a call with 3 rows would weigh as much as one with 3000 (gating makes per-layer batch sizes vary).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import warnings
from dataclasses import dataclass
from typing import Any

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
from edgegate.calibration.record import Augmentation, CalibrationRecord, Coverage, Fallback
from edgegate.calibration.retune import retune_exit_thresholds
from edgegate.data import Inputs
from edgegate.errors import EdgegateError
from edgegate.gates import GateMap, find_gates
from edgegate.quantization.apply import QuantModules, float_layers, kept_float, plan_from, quantize, unquantize_layer
from edgegate.quantization.config import QuantConfig
from edgegate.quantization.functional import ATTRIBUTE as FUNCTIONAL_ATTRIBUTE

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


@dataclass
class Observed:
    """One observation pass: quantizers calibrated under the calibration gating, before bias correction
    and threshold re-tuning (which `finish` applies, to this model or to a copy of it)."""

    config: QuantConfig
    gate_map: GateMap
    x: Inputs
    ref: nn.Module  # private float reference (its gating is changed temporarily)
    qmodel: nn.Module
    deployed: Coverage
    calibrated: Coverage
    augmentation: tuple[Augmentation, ...]
    fallbacks: tuple[Fallback, ...]
    thresholds: dict[str, list[float]]  # calibration-only exit thresholds (coverage augmentation)
    k_wide: dict[str, int]  # calibration-only top-k (coverage augmentation)
    extra: dict[str, int] = dataclasses.field(default_factory=dict)  # ACM: calibration-only extra learners

    def gating(self, qparts: GatedParts) -> contextlib.AbstractContextManager:
        """The gating the quantizers were calibrated under, on the quantized model ``qparts`` belong to."""
        if self.config.gate_aware:
            return augmented_gating(qparts, self.thresholds, self.k_wide, self.extra)
        return naive_gating(qparts)


def observe(model: nn.Module, data: Any, config: QuantConfig, gate_map: GateMap, input_spec: Specs) -> Observed:
    """Quantize a copy of ``model`` and calibrate its quantizers on ``data`` (one forward, see module doc)."""
    x = as_inputs(data, model, input_spec)
    # The float reference: every gating change on it is a context manager that puts it back, so a model in eval
    # mode serves as it is (a copy would double the float weights held during the search); one in training mode
    # is copied rather than switched.
    ref = copy.deepcopy(model).eval() if model.training else model
    check_fits(ref, x)
    qmodel, swapped = quantize(ref, config, gate_map, example=x)
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
        observed = Observed(config, gate_map, x, ref, qmodel, _coverage(deployed), Coverage(),
                            tuple(augmentation), (), thresholds, k_wide, extra)
        with calibration_mode(qmodel):
            with observed.gating(qparts), Probe(qmodel, paths, qparts) as seen:
                x.run(qmodel)
            rows = dict(seen.rows)
            fallbacks = _fallbacks(ref, qmodel, x, fparts, swapped, rows)
    rows = {p: n for p, n in rows.items() if p in swapped}
    if any(rows[p] == 0 for p in swapped):  # the invariant the fallbacks exist for; never ship a default
        raise EdgegateError(f"calibration left {[p for p in swapped if rows[p] == 0]} without data")
    below = [p for p, n in rows.items() if n < config.min_coverage]
    if below:
        log.info("calibration: %d layer(s) below min_coverage=%d rows: %s", len(below), config.min_coverage,
                 ", ".join(below))
    return dataclasses.replace(observed, calibrated=_coverage(seen, rows), fallbacks=tuple(fallbacks))


def finish(observed: Observed, config: QuantConfig | None = None, *,
           copy_model: bool = False) -> tuple[nn.Module, CalibrationRecord]:
    """Bias correction and threshold re-tuning as ``config`` says (default: the observed one; it may differ
    from it in those two switches only), then the plan and the record. ``copy_model``: leave
    ``observed.qmodel`` as it is (to finish it again another way)."""
    config = config or observed.config
    same = {"bias_correction": False, "retune_thresholds": False}
    if dataclasses.replace(config, **same) != dataclasses.replace(observed.config, **same):
        raise EdgegateError("finish: the config differs from the observed one in more than bias correction and "
                            "threshold re-tuning; observe again")
    qmodel = copy.deepcopy(observed.qmodel) if copy_model else observed.qmodel
    rows = observed.calibrated.layers
    # The quant layers by path and the functional-op quantizers (residual adds, ...) the plan also reads.
    swapped = QuantModules({p: qmodel.get_submodule(p) for p in rows})
    swapped.functional = getattr(qmodel, FUNCTIONAL_ATTRIBUTE, None)
    fparts, qparts = GatedParts.of(observed.ref, observed.gate_map), GatedParts.of(qmodel, observed.gate_map)
    with torch.no_grad():
        corrections: dict[str, float] = {}
        if config.bias_correction:
            with observed.gating(qparts):
                corrections = correct_biases(qmodel, observed.x, swapped)
        retuned = {}
        if config.gate_aware and config.retune_thresholds:
            retuned = retune_exit_thresholds(observed.ref, qmodel, observed.x, fparts, qparts)
        plan = plan_from(swapped, config.qdq_form, float_layers(qmodel), rows)
    reasons = kept_float(observed.ref, config, observed.gate_map)
    reasons.update({f.layer: f.reason for f in observed.fallbacks if f.action == "float"})
    record = CalibrationRecord(
        config=config, samples=len(observed.x), coverage=observed.deployed, calibrated=observed.calibrated,
        augmentation=observed.augmentation, fallbacks=observed.fallbacks, thresholds=retuned,
        bias_corrections=corrections,
        float_layers={p: reasons.get(p, "") for p in plan.float_layers}, plan=plan)
    return qmodel, record


def finished_state(observed: Observed) -> dict[tuple[str, str], torch.Tensor]:
    """A copy of what `finish` changes in place on ``observed.qmodel``, keyed by (module path, attribute): the
    quantized layers' biases (bias correction) and the early-exit thresholds (re-tuning). A few KiB, where a copy
    of the model is all its weights."""
    q = observed.qmodel
    state = {(p, "bias"): q.get_submodule(p).bias for p in observed.calibrated.layers
             if getattr(q.get_submodule(p), "bias", None) is not None}
    state.update({(p, "thresholds"): net.thresholds for p, net in GatedParts.of(q, observed.gate_map).exits.items()})
    return {k: v.detach().clone() for k, v in state.items()}


def restore_state(observed: Observed, state: dict[tuple[str, str], torch.Tensor]) -> None:
    """Put ``state`` (from `finished_state`) back on ``observed.qmodel``, in place."""
    with torch.no_grad():
        for (path, name), value in state.items():
            getattr(observed.qmodel.get_submodule(path), name).copy_(value)


def calibrate_once(model: nn.Module, data: Any, config: QuantConfig, gate_map: GateMap | None = None,
                   input_spec: Specs = None) -> tuple[nn.Module, CalibrationRecord]:
    """One calibration exactly as ``config`` says (no fidelity search): `observe`, then `finish`."""
    gate_map = find_gates(model) if gate_map is None else gate_map
    return finish(observe(model, data, config, gate_map, input_spec))
