"""The custom gating-op catalog: ONNX domain ``edgegate``, version 1 (DESIGN §4).

Each op is ONE definition, ``body(F, *inputs, **attrs)``, from which come:

* the numpy reference (:func:`reference`), the semantics every faster path is tested against,
* the torch forward (``edgegate.ops.torch_ops``: ``torch.ops.edgegate.<name>``, a
  ``torch.library.custom_op`` that the dynamo exporter turns into one named node of the ``edgegate``
  domain),
* the model-local ONNX function (``edgegate.ops.onnx_function``), standard ops only, so ONNX Runtime
  and the ONNX reference evaluator run an exported model with no plugin. TensorRT >= 10.7 may replace
  a function by a plugin of the same name; names are kept plugin-ready for that.

This module needs numpy only: the runtime side and the snn compiler read the catalog without torch
or onnx.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgegate.ops.backends import NUMPY, AttrInt
from edgegate.ops.packing import TERNARY_LUT

DOMAIN = "edgegate"
DOMAIN_VERSION = 1


@dataclass(frozen=True)
class OpDef:
    """One catalog entry. ``inputs``/``outputs`` are (name, type-constraint) pairs."""

    name: str  # ONNX op type, e.g. "TopKGate"
    torch_name: str  # torch.ops.edgegate.<torch_name>
    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[tuple[str, str], ...]
    attrs: tuple[str, ...]  # integer attributes
    body: Callable
    doc: str


TYPE_CONSTRAINTS = {
    "T": ["tensor(float)", "tensor(float16)"],
    "F": ["tensor(float)"],
    "B": ["tensor(bool)"],
    "I": ["tensor(int64)"],
    "U": ["tensor(uint8)"],
}


def _sigmoid_gate(F, x, g):
    return F.mul(x, F.sigmoid(g))


def _threshold_gate(F, h, tau, gain):
    return F.mul(F.mul(h, gain), F.cast_like(F.greater(h, tau), h))


def _channel_gate(F, x, mask_logits):
    keep = F.greater(F.sigmoid(mask_logits), F.cast_like(F.const(0.5, "float32"), mask_logits))
    return F.mul(x, F.cast_like(keep, x))


def _topk_gate(F, logits, k):
    p = F.softmax(F.cast(logits, "float32"))
    w, idx = F.topk(p, F.attr(k))
    return F.div(w, F.reduce_sum(w)), idx


def _exit_decision(F, logits, threshold):
    p = F.softmax(F.cast(logits, "float32"))
    return F.greater_equal(F.reduce_max(p), F.cast(threshold, "float32"))


def _learned_exit(F, gate_logit, threshold):
    return F.greater_equal(F.sigmoid(F.cast(gate_logit, "float32")), F.cast(threshold, "float32"))


def _ternary_matmul(F, x, packed_w, scale, in_features):
    codes = F.stack_last([F.bit_and(F.shift_right(packed_w, s), 3) for s in (0, 2, 4, 6)])
    codes = F.slice_last(F.flatten_last2(codes), F.attr(in_features))
    w = F.dequantize_rows(F.take(F.const(TERNARY_LUT, "int8"), codes), scale)
    return F.matmul(x, F.cast_like(F.transpose(w), x))


def _lowrank_correction(F, x, a, b, g):
    return F.mul(g, F.matmul(F.matmul(x, F.transpose(a)), F.transpose(b)))


CATALOG: dict[str, OpDef] = {
    op.name: op
    for op in (
        OpDef("SigmoidGate", "sigmoid_gate", (("x", "T"), ("g", "T")), (("y", "T"),), (), _sigmoid_gate,
              "y = x * sigmoid(g) (gated attention output gate)"),
        OpDef("ThresholdGate", "threshold_gate", (("h", "T"), ("tau", "T"), ("gain", "T")), (("y", "T"),), (),
              _threshold_gate, "y = h * gain * 1[h > tau] (TauGate, hard inference form)"),
        OpDef("ChannelGate", "channel_gate", (("x", "T"), ("mask_logits", "T")), (("y", "T"),), (),
              _channel_gate, "y = x * 1[sigmoid(mask_logits) > 0.5]; mask_logits broadcast to x per channel"),
        OpDef("TopKGate", "topk_gate", (("logits", "T"),), (("weights", "F"), ("indices", "I")), ("k",),
              _topk_gate, "softmax over experts in fp32, top-k, renormalize the k weights"),
        OpDef("ExitDecision", "exit_decision", (("logits", "T"), ("threshold", "F")), (("exit", "B"),), (),
              _exit_decision, "exit[b] = max softmax(logits[b]) >= threshold"),
        OpDef("LearnedExitDecision", "learned_exit_decision", (("gate_logit", "T"), ("threshold", "F")),
              (("exit", "B"),), (), _learned_exit, "exit[b] = sigmoid(gate_logit[b]) >= threshold"),
        OpDef("TernaryMatMul", "ternary_matmul", (("x", "T"), ("packed_w", "U"), ("scale", "F")), (("y", "T"),),
              ("in_features",), _ternary_matmul,
              "y = x @ (unpack(packed_w) * scale)^T; scale per row [N] or per tensor []; 4 weights a byte, LSB first"),
        OpDef("LowRankCorrection", "lowrank_correction", (("x", "T"), ("a", "T"), ("b", "T"), ("g", "T")),
              (("y", "T"),), (), _lowrank_correction, "y = g * (x @ a^T) @ b^T (HGF gated low-rank path)"),
    )
}


def reference(op_type: str, *inputs: np.ndarray, **attrs: int):
    """Run an op's numpy reference. Returns an array, or a tuple for multi-output ops."""
    op = CATALOG[op_type]
    return op.body(NUMPY, *[np.asarray(x) for x in inputs], **{a: AttrInt(a, attrs[a]) for a in op.attrs})


