"""The quantization plan: what calibration decided for each layer, in plain arrays.

Produced by gate-aware calibration (``edgegate.calibration``) from the brevitas quantizers it
drove; consumed by the ONNX lowering passes (``edgegate.onnx_export.passes.insert_qdq``) that put
QuantizeLinear/DequantizeLinear into the float export. Keeping the hand-off as numpy arrays keyed
by module path means the exporter never has to trace a brevitas module: the ONNX initializer of a
layer's weight is named ``<module path>.weight`` by the dynamo exporter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np


class QdqForm(StrEnum):
    """The form of the quantized graph a target consumes (DESIGN §5); a target declares its form as ``qdq_form``."""

    # uint8 asymmetric activations, int8 symmetric per-channel weights: ONNX Runtime's QDQ graph (x86 fuses it)
    ASYMMETRIC = "asymmetric"
    # int8 symmetric activations with zero point 0, int8 per-channel weights: TensorRT's explicit Q/DQ and the
    # snn integer form
    SYMMETRIC = "symmetric"


class LayerKind(StrEnum):
    LINEAR = "linear"
    CONV = "conv"


@dataclass(frozen=True)
class LayerQuant:
    """One quantized Linear/Conv: activation (input) quantizer, integer weight, float bias, and for a
    Conv of the ``asymmetric`` form an output quantizer (same type and observer as the input's): ONNX Runtime
    x86 runs a Conv as ``QLinearConv`` only when a QuantizeLinear follows it."""

    name: str  # module path in the model
    kind: LayerKind
    act_scale: float
    act_zero_point: int  # integer domain of the activation type: uint8 0..255, int8 zero point is 0
    act_signed: bool
    weight_int: np.ndarray  # int8, same shape as the float weight
    weight_scale: np.ndarray  # float32 [out_channels]
    bias: np.ndarray | None  # float32; lowered to int32 at scale act_scale * weight_scale[c]
    samples: int  # calibration rows (tokens/samples) that reached the layer
    act_bits: int = 8  # 16: A16W8, a decision-critical layer (uint16 activation, asymmetric form only)
    out_scale: float | None = None  # output quantizer (after the bias); None: the output stays float
    out_zero_point: int | None = None  # same integer domain as act_zero_point; None iff out_scale is None
    out_after_relu: bool = False  # the output quantizer sits after the Relu that alone reads the output

    def dequantized_weight(self) -> np.ndarray:
        shape = (-1,) + (1,) * (self.weight_int.ndim - 1)
        return self.weight_int.astype(np.float32) * self.weight_scale.reshape(shape).astype(np.float32)


@dataclass(frozen=True)
class OpQuant:
    """A functional op (``x + y``, ``torch.cat``, pooling, hardswish...) whose output is quantized.

    The op is the ``ordinal``-th call of ``kind`` in module ``scope`` during the forward
    (``edgegate.quantization.sites``); ``calls`` is how many calls of that kind the scope made in all,
    which the ONNX lowering checks against the nodes it finds. Its inputs are quantized where they are
    produced (a quantized Conv's output, another quantized op's output), never here. Transparent ops
    (max pooling, flatten, ReLU) carry their input's quantizer on, so ONNX Runtime can run them on uint8.
    """

    key: str
    scope: str
    kind: str  # edgegate.quantization.sites.OpKind value
    ordinal: int
    calls: int
    out_scale: float
    out_zero_point: int
    out_signed: bool
    out_after_relu: bool = False  # the quantizer sits after the Relu that alone reads the op's output


@dataclass(frozen=True)
class QuantPlan:
    qdq_form: QdqForm
    layers: dict[str, LayerQuant] = field(default_factory=dict)
    float_layers: tuple[str, ...] = ()  # Linear/Conv kept in float by the gate precision policy
    ops: dict[str, OpQuant] = field(default_factory=dict)  # quantized functional ops by site key

    def path_of_weight(self, name: str) -> str | None:
        """The layer (module path, quantized or float) whose ``<path>.weight`` initializer ``name`` is: the
        longest such path, so a wrapper's prefix on the ONNX name is allowed; None when no layer matches."""
        if not name.endswith(".weight"):
            return None
        base = name[: -len(".weight")]
        paths = [p for p in (*self.layers, *self.float_layers) if base == p or base.endswith("." + p)]
        return max(paths, key=len) if paths else None

    def to_dict(self) -> dict:
        """Summary for the manifest (no arrays)."""
        return {
            "qdq_form": str(self.qdq_form),
            "layers": {n: {"kind": str(q.kind), "act_scale": q.act_scale, "act_zero_point": q.act_zero_point,
                           "act_signed": q.act_signed, "act_bits": q.act_bits, "samples": q.samples,
                           "out_scale": q.out_scale, "out_zero_point": q.out_zero_point,
                           "out_after_relu": q.out_after_relu,
                           "weight_scale_range": [float(q.weight_scale.min()), float(q.weight_scale.max())]}
                       for n, q in sorted(self.layers.items())},
            "float_layers": list(self.float_layers),
            "ops": {k: {"kind": o.kind, "out_scale": o.out_scale, "out_zero_point": o.out_zero_point,
                        "out_after_relu": o.out_after_relu} for k, o in sorted(self.ops.items())},
        }
