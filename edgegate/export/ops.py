"""The custom gating-op catalog: ONNX domain ``edgegate``, version 1 (DESIGN §4).

Each op is ONE definition, ``body(F, *inputs, **attrs)``, from which come:

* the torch forward (``torch.ops.edgegate.<name>``, a ``torch.library.custom_op`` that the dynamo
  exporter turns into one named node of the ``edgegate`` domain),
* the numpy reference (:func:`reference`), the semantics every faster path is tested against,
* the model-local ONNX function (:func:`function_proto`), standard ops only, so ONNX Runtime and the
  ONNX reference evaluator run an exported model with no plugin. TensorRT >= 10.7 may replace a
  function by a plugin of the same name; names are kept plugin-ready for that.

Modules in ``edgegate.nn`` call the python wrappers at the bottom (``sigmoid_gate(x, g)`` ...). In
training (gradients needed) a wrapper runs the body on torch directly so autograd flows; in
inference and under ``torch.export`` it calls the custom op, so exported graphs keep the op's name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import onnx
from onnx import helper

from edgegate.export.opkit import NUMPY, ONNX_OPSET, AttrInt, OnnxBuilder, TorchBackend

DOMAIN = "edgegate"
DOMAIN_VERSION = 1

# 2-bit ternary code -> weight. 0b00 -> 0, 0b01 -> +1, 0b11 -> -1 (two's complement); 0b10 unused.
TERNARY_LUT = np.array([0, 1, 0, -1], dtype=np.int8)


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


_TYPES = {
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


@cache
def function_proto(op_type: str) -> onnx.FunctionProto:
    """The op's model-local ONNX function (standard ops, default opset ``ONNX_OPSET``)."""
    op = CATALOG[op_type]
    b = OnnxBuilder()
    in_names = [n for n, _ in op.inputs]
    out = op.body(b, *in_names, **{a: AttrInt(a, 0) for a in op.attrs})
    outs = out if isinstance(out, tuple) else (out,)
    for value, (name, _) in zip(outs, op.outputs, strict=True):
        b.nodes.append(helper.make_node("Identity", [value], [name]))
    return helper.make_function(
        DOMAIN, op.name, in_names, [n for n, _ in op.outputs], b.nodes,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)], attributes=list(op.attrs), doc_string=op.doc,
    )


def register_onnx_schemas() -> None:
    """Register each op's OpSchema so onnx shape inference and onnxscript know its signature."""
    from onnx import defs

    for op in CATALOG.values():
        if defs.has(op.name, DOMAIN):
            continue
        used = sorted({t for _, t in op.inputs + op.outputs})
        schema = defs.OpSchema(
            op.name, DOMAIN, DOMAIN_VERSION, doc=op.doc,
            inputs=[defs.OpSchema.FormalParameter(n, t) for n, t in op.inputs],
            outputs=[defs.OpSchema.FormalParameter(n, t) for n, t in op.outputs],
            type_constraints=[(t, _TYPES[t], "") for t in used],
            attributes=[defs.OpSchema.Attribute(a, defs.OpSchema.AttrType.INT, a) for a in op.attrs],
        )
        defs.register_schema(schema)


# ----------------------------------------------------------------------------------------------- torch side

_TORCH: TorchBackend | None = None


def _torch_backend() -> TorchBackend:
    global _TORCH
    if _TORCH is None:
        _TORCH = TorchBackend()
        _register_torch_ops()
    return _TORCH


def _torch_schema(op: OpDef) -> str:
    args = [f"Tensor {n}" for n, _ in op.inputs] + [f"int {a}" for a in op.attrs]
    outs = "Tensor" if len(op.outputs) == 1 else "(" + ", ".join("Tensor" for _ in op.outputs) + ")"
    return f"({', '.join(args)}) -> {outs}"


def _register_torch_ops() -> None:
    import torch

    for op in CATALOG.values():

        def impl(*args, _op=op):
            tensors, attr_vals = args[: len(_op.inputs)], args[len(_op.inputs):]
            attrs = {a: AttrInt(a, int(v)) for a, v in zip(_op.attrs, attr_vals, strict=True)}
            out = _op.body(_TORCH, *tensors, **attrs)
            # custom_op outputs may not alias inputs; contiguous() also materializes broadcasts.
            return tuple(o.contiguous().clone() for o in out) if isinstance(out, tuple) else out.clone()

        custom = torch.library.custom_op(f"{DOMAIN}::{op.torch_name}", impl, mutates_args=(),
                                         schema=_torch_schema(op))
        custom.register_fake(impl)


def onnx_translation_table() -> dict:
    """Exporter translations: each custom op becomes one node of the ``edgegate`` domain."""
    import torch
    from onnxscript.values import Opset

    _torch_backend()
    register_onnx_schemas()
    opset = Opset(DOMAIN, DOMAIN_VERSION)
    table = {}
    for op in CATALOG.values():

        def translate(*args, _op=op, **kwargs):
            n_in = len(_op.inputs)
            attrs = dict(zip(_op.attrs, args[n_in:], strict=False)) | kwargs
            return getattr(opset, _op.name)(*args[:n_in], **{a: int(attrs[a]) for a in _op.attrs})

        params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n, _ in op.inputs]
        params += [inspect.Parameter(a, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int)
                   for a in op.attrs]
        translate.__signature__ = inspect.Signature(params)
        translate.__annotations__ = {a: int for a in op.attrs}
        translate.__name__ = op.name
        table[getattr(torch.ops.edgegate, op.torch_name).default] = translate
    return table


def _needs_grad(tensors) -> bool:
    import torch

    return torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in tensors)


def call(op_type: str, *tensors, **attrs: int):
    """Run an op from torch: autograd-friendly body in training, the named custom op otherwise."""
    import torch

    op = CATALOG[op_type]
    backend = _torch_backend()
    if not torch.compiler.is_exporting() and _needs_grad(tensors):
        return op.body(backend, *tensors, **{a: AttrInt(a, int(attrs[a])) for a in op.attrs})
    return getattr(torch.ops.edgegate, op.torch_name)(*tensors, *[int(attrs[a]) for a in op.attrs])


def sigmoid_gate(x, g):
    return call("SigmoidGate", x, g)


def threshold_gate(h, tau, gain):
    return call("ThresholdGate", h, tau, gain)


def channel_gate(x, mask_logits):
    return call("ChannelGate", x, mask_logits)


def topk_gate(logits, k: int):
    return call("TopKGate", logits, k=k)


def exit_decision(logits, threshold):
    return call("ExitDecision", logits, threshold)


def learned_exit_decision(gate_logit, threshold):
    return call("LearnedExitDecision", gate_logit, threshold)


def ternary_matmul(x, packed_w, scale, in_features: int):
    return call("TernaryMatMul", x, packed_w, scale, in_features=in_features)


def lowrank_correction(x, a, b, g):
    return call("LowRankCorrection", x, a, b, g)


# ------------------------------------------------------------------------------------- ternary packing


def pack_ternary(w: np.ndarray) -> np.ndarray:
    """Pack a ternary matrix [N, K] in {-1, 0, +1} into uint8 [N, ceil(K/4)], 4 weights a byte, LSB first."""
    w = np.asarray(w)
    if w.ndim != 2 or not np.isin(w, (-1, 0, 1)).all():
        raise ValueError("pack_ternary expects a 2-D array with values in {-1, 0, +1}")
    n, k = w.shape
    codes = np.where(w < 0, 3, w).astype(np.uint8)
    codes = np.pad(codes, ((0, 0), (0, (-k) % 4))).reshape(n, -1, 4)
    return (codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)).astype(np.uint8)


def unpack_ternary(packed: np.ndarray, in_features: int) -> np.ndarray:
    """Inverse of :func:`pack_ternary` (numpy reference of the unpack inside ``TernaryMatMul``)."""
    packed = np.asarray(packed, dtype=np.uint8)
    codes = np.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], axis=-1).reshape(packed.shape[0], -1)
    return TERNARY_LUT[codes[:, :in_features]]
