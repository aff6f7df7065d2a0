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
from enum import StrEnum

import numpy as np

from edgegate.ops.backends import NUMPY, Attr, AttrKind
from edgegate.ops.packing import TERNARY_LUT

DOMAIN = "edgegate"
DOMAIN_VERSION = 1


@dataclass(frozen=True)
class AttrDef:
    """One op attribute: its name, kind and default (``None``: the caller must give it)."""

    name: str
    kind: AttrKind = AttrKind.INT
    default: int | float | None = None


@dataclass(frozen=True)
class OpDef:
    """One catalog entry. ``inputs``/``outputs`` are (name, type-constraint) pairs."""

    name: str  # ONNX op type, e.g. "TopKGate"
    torch_name: str  # torch.ops.edgegate.<torch_name>
    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[tuple[str, str], ...]
    attrs: tuple[AttrDef, ...]
    body: Callable
    doc: str

    def attr_values(self, given: dict[str, object]) -> dict[str, Attr]:
        """Every attribute as an :class:`Attr`: the given values (coerced to their kind), else defaults."""
        unknown = set(given) - {a.name for a in self.attrs}
        if unknown:
            raise TypeError(f"{self.name}: unknown attribute(s) {sorted(unknown)}")
        out = {}
        for a in self.attrs:
            value = given.get(a.name, a.default)
            if value is None:
                raise TypeError(f"{self.name}: attribute {a.name!r} is required")
            out[a.name] = Attr(a.name, a.kind, a.kind.coerce(value))
        return out


class Scoring(StrEnum):
    """How router logits become expert scores (TopKGate's ``scoring`` attribute is :attr:`code`)."""

    SOFTMAX = "softmax"  # Mixtral, Qwen-MoE: probabilities over all experts
    SIGMOID = "sigmoid"  # DeepSeek-V3, GLM-4.5: independent per-expert scores

    @property
    def code(self) -> int:
        return list(Scoring).index(self)


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


def _topk_gate(F, logits, bias, k, scoring, renormalize, scale, skip_importance, skip_threshold):
    x = F.cast(logits, "float32")
    scores = F.choose(F.attr(scoring), F.sigmoid(x), F.softmax(x))
    # The bias (score correction, DeepSeek-V3) only steers which experts win; the weights are the scores.
    _, idx = F.topk(F.add(scores, F.cast(bias, "float32")), F.attr(k))
    w = F.gather_last(scores, idx)
    w = F.choose(F.attr(renormalize), F.div(w, F.reduce_sum(w)), w)
    # MoDES dynamic expert skipping: a routed slot whose importance-weighted weight falls below the
    # threshold is dropped (weight 0), and the others are NOT renormalised. Threshold 0 keeps every slot.
    keep = F.greater_equal(F.mul(w, F.attr(skip_importance)), F.attr(skip_threshold))
    w = F.mul(w, F.cast_like(keep, w))
    return F.mul(w, F.attr(scale)), idx


def _learner_count(F, logits):
    # Ties resolve to the lower count (first maximum), as in numpy, torch and ONNX ArgMax.
    return F.argmax_last(F.cast(logits, "float32"))


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
        OpDef("TopKGate", "topk_gate", (("logits", "T"), ("bias", "F")), (("weights", "F"), ("indices", "I")),
              (AttrDef("k"), AttrDef("scoring", default=0), AttrDef("renormalize", default=1),
               AttrDef("scale", AttrKind.FLOAT, 1.0), AttrDef("skip_importance", AttrKind.FLOAT, 1.0),
               AttrDef("skip_threshold", AttrKind.FLOAT, 0.0)),
              _topk_gate, "scores = softmax (scoring=0) or sigmoid (scoring=1) of the logits in fp32; the top-k of "
              "scores + bias [E] pick the experts; weights = their scores, divided by their sum when renormalize=1; "
              "a slot with skip_importance * weight < skip_threshold gets weight 0 (MoDES expert skipping, no "
              "renormalisation after it); times scale"),
        OpDef("LearnerCount", "learner_count", (("logits", "T"),), (("count", "I"),), (), _learner_count,
              "count[t] = argmax over the N+1 gate logits of token t (first maximum): how many of an Adaptive "
              "Computation Module's N learners token t runs"),
        OpDef("ExitDecision", "exit_decision", (("logits", "T"), ("threshold", "F")), (("exit", "B"),), (),
              _exit_decision, "exit[b] = max softmax(logits[b]) >= threshold"),
        OpDef("LearnedExitDecision", "learned_exit_decision", (("gate_logit", "T"), ("threshold", "F")),
              (("exit", "B"),), (), _learned_exit, "exit[b] = sigmoid(gate_logit[b]) >= threshold"),
        OpDef("TernaryMatMul", "ternary_matmul", (("x", "T"), ("packed_w", "U"), ("scale", "F")), (("y", "T"),),
              (AttrDef("in_features"),), _ternary_matmul,
              "y = x @ (unpack(packed_w) * scale)^T; scale per row [N] or per tensor []; 4 weights a byte, LSB first"),
        OpDef("LowRankCorrection", "lowrank_correction", (("x", "T"), ("a", "T"), ("b", "T"), ("g", "T")),
              (("y", "T"),), (), _lowrank_correction, "y = g * (x @ a^T) @ b^T (HGF gated low-rank path)"),
    )
}


def reference(op_type: str, *inputs: np.ndarray, **attrs: int | float):
    """Run an op's numpy reference. Returns an array, or a tuple for multi-output ops."""
    op = CATALOG[op_type]
    return op.body(NUMPY, *[np.asarray(x) for x in inputs], **op.attr_values(attrs))


