"""The pipeline's quantize step: float model -> (model to export, ONNX lowering, manifest record).

Input: the loaded float model, its GateMap, calibration / held-out data (every model input, keyed by
name), the model's input specs and the export options.
Output: a ``Quantized`` value: the torch model whose export is the deployed graph (float weights
with re-tuned exit thresholds for int8, ``TernaryPTQLinear`` layers for ternary), a function that
lowers that export (QDQ insertion from the calibrated plan), the fake-quant torch reference that
golden outputs are checked against, and the JSON record for the manifest. Gate fidelity is measured
on the held-out rows when there are some, else on the calibration rows, and the record says which
(``fidelity.measured_on``), how many of them the model was trained on, and each agreement's 95%
interval. A built-in dataset holds out every row it does not calibrate on (its test split first, then its
train split): agreement compares the quantized model with the float one, so rows the model was trained
on measure it as well, and a few hundred test rows cannot resolve half a percent. Accuracy and loss
are taken on the rows the model never saw (the test split). A gate metric below the fidelity target
on the held-out rows, or a target the search could not meet, is a warning in the record (``warnings``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from edgegate.data import Dataset, Inputs, TensorSpec
from edgegate.errors import EdgegateError
from edgegate.gates import GateKind, GateMap
from edgegate.heap import release_freed_heap
from edgegate.metrics import wilson
from edgegate.quantization.config import DEFAULT_FIDELITY_TARGET, QuantConfig
from edgegate.quantization.fold import fold_batchnorm
from edgegate.quantization.plan import QdqForm
from edgegate.quantization.policy import decision_layers
from edgegate.quantization.ternary import ternarize_model
from edgegate.schemes import QuantScheme

# Rows per forward of the held-out fidelity: both models' outputs of all rows at once are the export's peak
# on a causal LM (2 x 256 MiB of logits for 512 rows of 16 tokens over 8 192 words).
FIDELITY_BATCH = 128


@dataclass(frozen=True)
class QuantOptions:
    scheme: QuantScheme = QuantScheme.FP32
    observer: str = "percentile"
    gate_precision: str | None = None  # None: float for gate-aware, int8 for naive
    calibration: str = "gate_aware"
    lowrank: int = 0
    min_coverage: int = 32
    fidelity_target: float = DEFAULT_FIDELITY_TARGET  # int8 gate-aware: agreement every gate must keep; 0: off


@dataclass(frozen=True)
class Quantized:
    export_model: nn.Module
    reference: nn.Module  # what golden outputs are compared with (fake-quant for int8)
    # The export lowered; it may change the proto it is given (the pipeline's own, replaced by the result).
    lower: Callable[[onnx.ModelProto], onnx.ModelProto]
    record: dict[str, Any] = field(default_factory=dict)
    exact: bool = True  # ORT must match ``reference`` to float tolerance (no integer kernels involved)


def _identity(proto: onnx.ModelProto) -> onnx.ModelProto:
    return proto


def _lower_float(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A float export: its sparse MoE blocks (cpu) lowered, in place; nothing else changes."""
    # The export stage's passes import this stage's plan: loaded when the step runs.
    from edgegate.onnx_export.passes.lower_moe import lower_routed_experts

    return lower_routed_experts(proto, inplace=True)


def _lower_int8(plan):
    """QDQ from the plan, after the sparse MoE blocks (cpu) are lowered in place (``QMoE`` and int8
    gather/scatter)."""
    # The export stage's passes import this stage's plan: loaded when the step runs (see _lower_float).
    from edgegate.onnx_export.passes.insert_qdq import insert_qdq
    from edgegate.onnx_export.passes.lower_moe import lower_routed_experts

    return lambda proto: insert_qdq(lower_routed_experts(proto, plan, inplace=True), plan)


def quantize_for_export(model: nn.Module, gate_map: GateMap, options: QuantOptions, qdq_form: QdqForm,
                        calib: Dataset | None, held_out: Dataset | None,
                        spec: TensorSpec | Sequence[TensorSpec] | None) -> Quantized:
    """The quantize step for ``options.scheme``; ``spec``: the model's input (or one per input, in order; None:
    the data's arrays as stored, unchecked)."""
    specs = [] if spec is None else [spec] if isinstance(spec, TensorSpec) else list(spec)
    scheme = QuantScheme.parse(options.scheme)
    if not scheme.calibrated:  # fp16 is a build flag of the target (trt), the graph stays float
        if options.lowrank:
            raise EdgegateError("--lowrank needs --quant ternary")
        # Ternary layers round their activations per token inside the graph: a value within an ulp of a
        # rounding boundary may round differently in ORT and torch and move the output by a quantization
        # step, so such a graph is checked like a quantized one, not to float round-off.
        rounds = any(g.kind in (GateKind.TERNARY, GateKind.LOWRANK) for g in gate_map)
        return Quantized(model, model, _lower_float, {"scheme": str(scheme)}, exact=not rounds)
    if calib is None:
        raise EdgegateError(f"--quant {options.scheme} needs calibration data: pass --calib NAME|file.npz "
                            "(the checkpoint names no dataset)")
    x_cal = torch_inputs(calib, specs)
    if scheme is QuantScheme.TERNARY:
        return _ternary(model, gate_map, options, qdq_form, x_cal)
    return _int8(model, gate_map, options, qdq_form, x_cal, calib, held_out, specs)


def torch_inputs(data: Dataset, specs: Sequence[TensorSpec]) -> Inputs:
    """Every row of ``data`` as torch tensors, one per model input in ``specs`` order."""
    return data.model_inputs([s.name for s in specs] or None).map(lambda a: torch.from_numpy(np.ascontiguousarray(a)))


def _int8(model, gate_map, options, qdq_form, x_cal, calib, held_out, specs) -> Quantized:
    from edgegate.calibration import calibrate  # brevitas, which only an int8 export needs

    if options.lowrank:
        raise EdgegateError("--lowrank needs --quant ternary")
    # Calibrate and export the model the runtime computes: BatchNorm folded into its conv.
    model, folded = fold_batchnorm(model, x_cal[:8])
    config = QuantConfig(observer=options.observer, qdq_form=qdq_form, gate_precision=options.gate_precision,
                         calibration=options.calibration, min_coverage=options.min_coverage,
                         fidelity_target=options.fidelity_target)
    qmodel, record = calibrate(model, x_cal, config, gate_map, input_spec=specs)
    release_freed_heap()  # the calibration's activations, before the fidelity runs make their own
    fidelity = held_out_fidelity(model, qmodel, gate_map, calib, held_out, specs)
    record = record.with_fidelity(fidelity)
    warnings = fidelity_warnings(record.to_dict(), config.fidelity_target if config.gate_aware else 0.0)
    # The module tree copied, the parameters shared: a second copy of the weights is the size of the model
    # (236 MB on a 59M-parameter LM). Buffers are copied: set_thresholds writes the copy's in place.
    deployed = copy.deepcopy(model, {id(p): p for p in model.parameters()}).eval()
    for path, values in record.thresholds.items():
        # The exported graph is the float model with Q/DQ added: give it the re-tuned operating point.
        deployed.get_submodule(path).set_thresholds(values["after"])
    plan = record.plan
    return Quantized(deployed, qmodel.eval(), _lower_int8(plan),
                     {"scheme": "int8", **record.to_dict(), "warnings": warnings, "folded_batchnorm": folded},
                     exact=False)


def held_out_fidelity(model: nn.Module, qmodel: nn.Module, gate_map: GateMap, calib: Dataset,
                      held_out: Dataset | None, specs: Sequence[TensorSpec]) -> dict[str, Any]:
    """Float vs quantized on the held-out rows (else the calibration rows, and it says so): agreements on
    every row, accuracy and loss on the rows the model was not trained on (a built-in's test split)."""
    from edgegate.calibration import measure_fidelity  # brevitas: int8 exports only (see _int8)

    part = held_out if held_out is not None else calib
    fidelity = measure_fidelity(model, qmodel, torch_inputs(part, specs), None, gate_map, input_spec=specs,
                                batch_size=FIDELITY_BATCH)
    fidelity["measured_on"] = "held_out" if held_out is not None else "calibration"
    fidelity["trained_rows"] = len(part.splits["train"]) if "train" in part.splits else 0
    unseen = part.split("test") if "test" in part.splits else part
    if unseen.labels is not None:
        scored = measure_fidelity(model, qmodel, torch_inputs(unseen, specs), unseen.labels, gate_map,
                                  input_spec=specs, batch_size=FIDELITY_BATCH)
        for key in ("accuracy", "loss"):
            fidelity[key] = {**scored[key], "samples": scored["samples"]}
        fidelity["intervals"]["accuracy"] = scored["intervals"]["accuracy"]
    return fidelity


def fidelity_warnings(record: dict[str, Any], target: float) -> list[str]:
    """One line per shortfall: the search's own (target not met on the calibration rows), and each gate metric
    that misses ``target`` on the held-out rows although the search met it."""
    from edgegate.calibration.kinds import higher_is_better  # brevitas: int8 exports only (see _int8)
    from edgegate.calibration.search import WORDS  # brevitas: int8 exports only (see _int8)

    search = record.get("search") or {}
    out = [search["warning"]] if search.get("warning") else []
    fid = record.get("fidelity") or {}
    if not target or not search.get("met") or fid.get("measured_on") != "held_out":
        return out
    higher = higher_is_better()
    for metric in search.get("metrics", []):
        value = (fid.get("summary") or {}).get(metric, fid.get(metric))
        if value is None:
            continue
        agreement = value if higher.get(metric, True) else 1 - value  # a disagreement rate: 1 - it must reach it
        if agreement < target:
            ci = (fid.get("intervals") or {}).get(metric) or wilson(value, fid.get("samples", 0)).to_dict()
            out.append(f"held-out {WORDS[metric]} {value:.4f} (95% CI {ci['low']:.4f}-{ci['high']:.4f}, "
                       f"{ci['rows']} rows) misses the fidelity target {target:g} that the calibration rows met")
    return out


def _ternary(model, gate_map, options, qdq_form, x_cal) -> Quantized:
    from edgegate.onnx_export.passes.lower_ternary import lower_ternary  # the export stage's pass (see _int8)

    keep = decision_layers(model, gate_map)
    tmodel, report = ternarize_model(model, x_cal, keep_float=set(keep), rank=options.lowrank)
    record = {"scheme": "ternary", "lowrank": options.lowrank, **report.to_dict(),
              "kept_float_reasons": keep}
    if qdq_form is not QdqForm.ASYMMETRIC:
        return Quantized(tmodel, tmodel, _identity, record)
    # CPU: TernaryMatMul becomes integer MatMulInteger on the constant-folded unpack; post-training
    # layers take float activations, which the lowering quantizes dynamically, so the graph follows
    # torch to within a few output steps rather than float round-off.
    return Quantized(tmodel, tmodel, lower_ternary, record, exact=False)
