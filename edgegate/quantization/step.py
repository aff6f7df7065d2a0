"""The pipeline's quantize step: float model -> (model to export, ONNX lowering, manifest record).

Input: the loaded float model, its GateMap, calibration / held-out data and the export options.
Output: a ``Quantized`` value: the torch model whose export is the deployed graph (float weights
with re-tuned exit thresholds for int8, ``TernaryPTQLinear`` layers for ternary), a function that
lowers that export (QDQ insertion from the calibrated plan), the fake-quant torch reference that
golden outputs are checked against, and the JSON record for the manifest.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from edgegate.data import Dataset, TensorSpec
from edgegate.errors import EdgegateError
from edgegate.gates import GateMap
from edgegate.quantization.plan import Flavor

SCHEMES = ("fp32", "fp16", "int8", "ternary")


@dataclass(frozen=True)
class QuantOptions:
    scheme: str = "fp32"
    observer: str = "percentile"
    gate_precision: str | None = None  # None: float for gate-aware, int8 for naive
    calibration: str = "gate_aware"
    lowrank: int = 0
    min_coverage: int = 32


@dataclass(frozen=True)
class Quantized:
    export_model: nn.Module
    reference: nn.Module  # what golden outputs are compared with (fake-quant for int8)
    lower: Callable[[onnx.ModelProto], onnx.ModelProto]
    record: dict[str, Any] = field(default_factory=dict)
    exact: bool = True  # ORT must match ``reference`` to float tolerance (no integer kernels involved)


def _identity(proto: onnx.ModelProto) -> onnx.ModelProto:
    return proto


def quantize_for_export(model: nn.Module, gate_map: GateMap, options: QuantOptions, flavor: Flavor,
                        calib: Dataset | None, held_out: Dataset | None, spec: TensorSpec) -> Quantized:
    if options.scheme not in SCHEMES:
        raise EdgegateError(f"--quant {options.scheme} is unknown; use one of {', '.join(SCHEMES)}")
    if options.scheme in ("fp32", "fp16"):  # fp16 is a build flag of the target (trt), the graph stays float
        if options.lowrank:
            raise EdgegateError("--lowrank needs --quant ternary")
        return Quantized(model, model, _identity, {"scheme": options.scheme})
    if calib is None:
        raise EdgegateError(f"--quant {options.scheme} needs calibration data: pass --calib NAME|file.npz "
                            "(the checkpoint names no dataset)")
    x_cal = torch.from_numpy(calib.input())
    if options.scheme == "ternary":
        return _ternary(model, gate_map, options, flavor, x_cal)
    return _int8(model, gate_map, options, flavor, x_cal, held_out, spec)


def _int8(model, gate_map, options, flavor, x_cal, held_out, spec) -> Quantized:
    from edgegate.calibration import calibrate, measure_fidelity
    from edgegate.onnx_export.passes.insert_qdq import insert_qdq
    from edgegate.quantization.config import QuantConfig
    from edgegate.quantization.fold import fold_batchnorm

    if options.lowrank:
        raise EdgegateError("--lowrank needs --quant ternary")
    # Calibrate and export the model the runtime computes: BatchNorm folded into its conv.
    model, folded = fold_batchnorm(model, x_cal[:8])
    config = QuantConfig(observer=options.observer, flavor=flavor, gate_precision=options.gate_precision,
                         calibration=options.calibration, min_coverage=options.min_coverage)
    qmodel, record = calibrate(model, x_cal, config, gate_map, input_spec=spec)
    if held_out is not None:
        record = record.with_fidelity(measure_fidelity(model, qmodel, held_out.input(), held_out.labels, gate_map,
                                                       input_spec=spec))
    deployed = copy.deepcopy(model).eval()
    for path, values in record.thresholds.items():
        # The exported graph is the float model with Q/DQ added: give it the re-tuned operating point.
        deployed.get_submodule(path).set_thresholds(values["after"])
    plan = record.plan
    return Quantized(deployed, qmodel.eval(), lambda proto: insert_qdq(proto, plan),
                     {"scheme": "int8", **record.to_dict(), "folded_batchnorm": folded}, exact=False)


def _ternary(model, gate_map, options, flavor, x_cal) -> Quantized:
    from edgegate.onnx_export.passes.lower_ternary import lower_ternary
    from edgegate.quantization.policy import decision_layers
    from edgegate.quantization.ternary import ternarize_model

    keep = decision_layers(model, gate_map)
    tmodel, report = ternarize_model(model, x_cal, keep_float=set(keep), rank=options.lowrank)
    record = {"scheme": "ternary", "lowrank": options.lowrank, **report.to_dict(),
              "kept_float_reasons": keep}
    if flavor is not Flavor.CPU:
        return Quantized(tmodel, tmodel, _identity, record)
    # CPU: TernaryMatMul becomes integer MatMulInteger on the constant-folded unpack; post-training
    # layers take float activations, which the lowering quantizes dynamically, so the graph follows
    # torch to within a few output steps rather than float round-off.
    return Quantized(tmodel, tmodel, lower_ternary, record, exact=False)


def split_data(dataset: Dataset) -> tuple[Dataset, Dataset | None]:
    """(calibration, held-out): the val/test splits of a built-in; all of a user file, no held-out."""
    if {"val", "test"} <= set(dataset.splits):
        return dataset.split("val"), dataset.split("test")
    return dataset, None


def agreement(got: list[np.ndarray], want: list[np.ndarray], names: list[str]) -> dict[str, float]:
    """How closely a quantized runtime follows its torch reference (top-1 and exit agreement, errors)."""
    out: dict[str, float] = {}
    for name, g, w in zip(names, got, want, strict=True):
        if g.dtype.kind in "iub":
            out[f"{name}_agreement"] = float(np.mean(g == w))
            continue
        out[f"{name}_max_abs_err"] = float(np.max(np.abs(g.astype(np.float64) - w)))
        out[f"{name}_scale"] = float(np.max(np.abs(w)))
        if g.ndim >= 2:
            out[f"{name}_top1_agreement"] = float(np.mean(g.argmax(-1) == w.argmax(-1)))
    return out
