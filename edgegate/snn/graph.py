"""Read the feed-forward chain an SNN can run out of an exported ONNX graph.

Stage: targets (snn), compile side (needs onnx). Input: an ``onnx.ModelProto`` as the export
pipeline hands it over (fp32, int8 QDQ, or ternary with ``edgegate::TernaryMatMul``). Output: the
`FloatLayer` chain from the graph input to the first graph output, in float (weights dequantized),
plus the `CheckIssue` of every node on that path the SNN cannot represent.

The walk goes backwards from the first output. It understands Gemm, MatMul, Conv (group 1, unrolled
into a [C_out*H'*W', C*H*W] matrix once the input shape is known; Flatten/Reshape pass through),
Add of a constant bias, Relu, ``edgegate::ThresholdGate``, ``edgegate::TernaryMatMul``,
QuantizeLinear -> DequantizeLinear on activations (the layer input's fake quantization, kept for
the float reference) and the row compaction of early-exit graphs (GatherND of the surviving rows,
ScatterND of their results), which is the identity for one sample. Exit heads and ``ExitDecision``
hang off that path and are left out: the SNN decides early in time instead (``ExitPolicy``).
Anything else on the path is an issue.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from edgegate.ops.packing import unpack_ternary
from edgegate.targets.base import CheckIssue

ACTIVATIONS = ("relu", "gate", "none")
EXIT_OPS = ("ExitDecision", "LearnedExitDecision")


@dataclasses.dataclass
class FloatLayer:
    """One Linear layer of the chain, as float: ``act(W @ q(x) + b)``."""

    name: str  # the ONNX node that computes W @ x
    weight: np.ndarray  # float64 [n_out, n_in], dequantized
    bias: np.ndarray  # float64 [n_out]
    act: str = "none"  # relu | gate (ThresholdGate: h * gain * 1[h > tau]) | none
    tau: np.ndarray | None = None
    gain: np.ndarray | None = None
    ternary: np.ndarray | None = None  # int8 codes [n_out, n_in] in {-1, 0, 1} when the layer is ternary
    ternary_scale: np.ndarray | None = None  # float64 [n_out]
    input_quant: tuple[float, int, int, int] | None = None  # (scale, zero point, qmin, qmax) of the input
    conv: dict | None = None  # Conv kernel and attributes until `_unroll` turns it into ``weight``

    def forward(self, x: np.ndarray) -> np.ndarray:
        if self.input_quant is not None:
            s, zp, lo, hi = self.input_quant
            x = (np.clip(np.rint(x / s) + zp, lo, hi) - zp) * s
        h = x @ self.weight.T + self.bias
        if self.act == "relu":
            return np.maximum(h, 0.0)
        if self.act == "gate":
            return h * self.gain * (h > self.tau)
        return h


@dataclasses.dataclass
class Chain:
    layers: list[FloatLayer]
    input_name: str
    output_name: str
    exits: int  # exit decisions found in the graph (0: no early exit)
    issues: list[CheckIssue]

    def forward(self, x: np.ndarray, upto: int | None = None) -> list[np.ndarray]:
        """Float reference: every layer's output for x [B, features]."""
        outs = []
        a = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        for layer in self.layers[:upto]:
            a = layer.forward(a)
            outs.append(a)
        return outs


def read_chain(model) -> Chain:
    """The chain from the (single) graph input to the first graph output; issues instead of exceptions."""
    from onnx import numpy_helper

    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    producer = {o: n for n in g.node for o in n.output}
    inputs = [i.name for i in g.input if i.name not in consts]
    issues: list[CheckIssue] = []
    exits = sum(n.op_type in EXIT_OPS and n.domain == "edgegate" for n in g.node)
    if len(inputs) != 1:
        issues.append(CheckIssue("<graph>", "graph", f"the snn target takes one graph input, found {inputs}",
                                 "export a model with a single input"))
        return Chain([], "", g.output[0].name if g.output else "", exits, issues)
    walker = _Walker(consts, producer, inputs[0])
    out = g.output[0].name
    layers = walker.walk(out)
    issues.extend(walker.issues)
    if not issues:
        shape = next(i for i in g.input if i.name == inputs[0]).type.tensor_type.shape
        issues.extend(_unroll(layers, [d.dim_value if d.HasField("dim_value") else None for d in shape.dim][1:]))
    if not issues and not layers:
        issues.append(CheckIssue(out, "graph", "no Linear layer between the input and the first output",
                                 "the snn target compiles Linear (Gemm/MatMul) + ReLU chains"))
    for layer in layers[:-1]:
        if layer.act == "none" and not issues:
            issues.append(CheckIssue(layer.name, "Gemm", "a hidden Linear layer without ReLU or ThresholdGate: "
                                     "spike rates cannot carry negative activations",
                                     "add a ReLU after it, or fold it into the next Linear layer"))
    return Chain(layers, inputs[0], out, exits, issues)


def _unroll(layers: list[FloatLayer], shape: list[int | None]) -> list[CheckIssue]:
    """Give each Conv its dense [out, in] matrix (C-order flattening, as Flatten does) and check the sizes."""
    for layer in layers:
        if layer.conv is not None:
            if len(shape) != 3 or None in shape:
                return [CheckIssue(layer.name, "Conv", f"Conv input has shape {shape}, needs a static [C, H, W]",
                                   "export with a fixed image size")]
            layer.weight, shape = _conv_matrix(layer.conv, tuple(shape))
            layer.bias = np.repeat(layer.bias, int(np.prod(shape[1:])))
            layer.conv = None
        else:
            if None not in shape and int(np.prod(shape)) != layer.weight.shape[1]:
                return [CheckIssue(layer.name, "Gemm", f"input of {int(np.prod(shape))} values for a layer that "
                                   f"takes {layer.weight.shape[1]}", "only Flatten/Reshape to [B, -1] may sit "
                                   "between layers")]
            shape = [layer.weight.shape[0]]
    return []


def _conv_matrix(conv: dict, shape: tuple[int, int, int]) -> tuple[np.ndarray, list[int]]:
    """The Conv as a matrix [C_out*H'*W', C*H*W] on C-order flattened maps, and the output shape."""
    k = conv["kernel"]
    c_out, c_in, kh, kw = k.shape
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = conv["strides"], conv["dilations"], conv["pads"]
    c, h, w = shape
    ho, wo = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    m = np.zeros((c_out, ho, wo, c, h, w))
    oy, ox, ky, kx = np.meshgrid(np.arange(ho), np.arange(wo), np.arange(kh), np.arange(kw), indexing="ij")
    iy, ix = oy * sh - pt + ky * dh, ox * sw - pl + kx * dw
    ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    oy, ox, ky, kx, iy, ix = (a[ok] for a in (oy, ox, ky, kx, iy, ix))
    for co in range(c_out):
        for ci in range(c_in):
            np.add.at(m[co, :, :, ci], (oy, ox, iy, ix), k[co, ci, ky, kx])
    return m.reshape(c_out * ho * wo, c * h * w), [c_out, ho, wo]


class _Walker:
    def __init__(self, consts: dict, producer: dict, input_name: str) -> None:
        self.consts, self.producer, self.input_name = consts, producer, input_name
        self.issues: list[CheckIssue] = []

    def const(self, name: str) -> np.ndarray | None:
        if name in self.consts:
            return self.consts[name]
        node = self.producer.get(name)
        if node is not None and node.op_type == "DequantizeLinear":
            x = self.const(node.input[0])
            s = self.const(node.input[1])
            zp = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.int64)
            if x is None or s is None or zp is None:
                return None
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * x.ndim
            if s.ndim == 1 and x.ndim > 0:
                shape[axis] = -1
            return (x.astype(np.float64) - zp.reshape(shape)) * s.astype(np.float64).reshape(shape)
        if node is not None and node.op_type in ("Identity", "Cast") and node.input:
            return self.const(node.input[0])
        return None

    def fail(self, node, message: str, hint: str = "") -> list[FloatLayer]:
        where = node.name or f"<{node.op_type} -> {node.output[0]}>"
        self.issues.append(CheckIssue(where, node.op_type, message, hint or
                                      "the snn target compiles Linear/MatMul + ReLU chains with "
                                      "ThresholdGate, TernaryMatMul and early exits"))
        return []

    def walk(self, tensor: str) -> list[FloatLayer]:
        """Layers from the input up to ``tensor``, in order (iterative: graphs may be deep)."""
        layers: list[FloatLayer] = []  # collected backwards
        pending_act, pending_bias = "none", None
        gate = (None, None)
        while tensor != self.input_name:
            node = self.producer.get(tensor)
            if node is None:
                self.issues.append(CheckIssue(tensor, "tensor", f"tensor {tensor} has no producer and is not the "
                                              "graph input", "export the model again"))
                return []
            op, dom = node.op_type, node.domain
            if dom == "edgegate" and op == "ThresholdGate":
                tau, gain = self.const(node.input[1]), self.const(node.input[2])
                if tau is None or gain is None or pending_act != "none":
                    return self.fail(node, "ThresholdGate needs constant tau and gain right after a Linear layer")
                pending_act, gate, tensor = "gate", (tau, gain), node.input[0]
            elif dom in ("", "ai.onnx") and op == "Relu":
                if pending_act != "none":
                    return self.fail(node, "two activations in a row")
                pending_act, tensor = "relu", node.input[0]
            elif dom in ("", "ai.onnx") and op == "Add":
                a, b = (self.const(x) for x in node.input)
                if (a is None) == (b is None) or pending_bias is not None:
                    return self.fail(node, "Add of two activations (a residual or a merge) has no SNN form")
                pending_bias = np.asarray(b if a is None else a, np.float64).reshape(-1)
                tensor = node.input[0] if a is None else node.input[1]
            elif dom in ("", "ai.onnx") and op in ("Gemm", "MatMul", "Conv") or \
                    dom == "edgegate" and op == "TernaryMatMul":
                layer = self.conv(node, pending_bias) if op == "Conv" else self.linear(node, pending_bias)
                if layer is None:
                    return []
                layer.act, layer.input_quant = pending_act, None
                if pending_act == "gate":
                    layer.tau, layer.gain = (np.broadcast_to(np.asarray(v, np.float64).reshape(-1), layer.bias.shape)
                                             .copy() for v in gate)
                layers.append(layer)
                pending_act, pending_bias, tensor = "none", None, node.input[0]
            elif dom in ("", "ai.onnx") and op == "DequantizeLinear":
                q = self.producer.get(node.input[0])
                if q is None or q.op_type != "QuantizeLinear" or not layers:
                    return self.fail(node, "DequantizeLinear of an activation without a QuantizeLinear before it")
                s, zp = self.const(q.input[1]), self.const(q.input[2]) if len(q.input) > 2 else np.zeros((), np.uint8)
                if s is None or zp is None or s.size != 1:
                    return self.fail(node, "activation quantization must be per tensor with constant scale")
                info = np.iinfo(zp.dtype)
                layers[-1].input_quant = (float(s.reshape(())), int(zp.reshape(())), int(info.min), int(info.max))
                tensor = q.input[0]
            elif dom in ("", "ai.onnx") and op in ("Flatten", "Reshape"):
                tensor = node.input[0]  # [B, C, H, W] -> [B, C*H*W]: the chain is flat already (checked in _unroll)
            elif dom in ("", "ai.onnx") and op == "GatherND" and self.const(node.input[0]) is None:
                tensor = node.input[0]  # early-exit compaction: the rows still running
            elif dom in ("", "ai.onnx") and op == "ScatterND":
                tensor = node.input[2]  # early-exit compaction: the last stage's rows written back
            elif dom in ("", "ai.onnx") and op == "If":
                return self.fail(node, "early exit exported as If (batch 1) has no SNN form",
                                 "export with a dynamic batch (leave out --batch) so exits use compaction")
            else:
                return self.fail(node, f"op {dom or 'ai.onnx'}::{op} on the input-to-output path has no SNN form")
        if pending_act != "none" or pending_bias is not None:
            self.issues.append(CheckIssue(tensor, "graph", "an activation or bias is applied to the raw input",
                                          "start the model with a Linear layer"))
            return []
        return layers[::-1]

    def conv(self, node, bias: np.ndarray | None) -> FloatLayer | None:
        attrs = {a.name: a for a in node.attribute}
        k = self.const(node.input[1])
        if len(node.input) > 2 and node.input[2]:
            c = self.const(node.input[2])
            if c is None or bias is not None:
                self.fail(node, "Conv bias must be a constant")
                return None
            bias = np.asarray(c, np.float64).reshape(-1)
        if k is None or k.ndim != 4 or (attrs["group"].i if "group" in attrs else 1) != 1 \
                or "auto_pad" in attrs and attrs["auto_pad"].s not in (b"", b"NOTSET"):
            self.fail(node, "Conv needs a constant 2-D kernel, group 1 and explicit pads")
            return None
        ints = {n: list(attrs[n].ints) if n in attrs else d for n, d in
                (("strides", [1, 1]), ("dilations", [1, 1]), ("pads", [0, 0, 0, 0]))}
        pads = ints["pads"]
        conv = {"kernel": np.asarray(k, np.float64), "strides": ints["strides"], "dilations": ints["dilations"],
                "pads": (pads[0], pads[1], pads[2], pads[3])}
        b = np.zeros(k.shape[0]) if bias is None else np.broadcast_to(bias, (k.shape[0],)).astype(np.float64)
        return FloatLayer(node.name or node.output[0], np.zeros((k.shape[0], 0)), b.copy(), conv=conv)

    def linear(self, node, bias: np.ndarray | None) -> FloatLayer | None:
        attrs = {a.name: a for a in node.attribute}
        name = node.name or node.output[0]
        ternary = scale = None
        if node.op_type == "TernaryMatMul":

            packed, s = self.const(node.input[1]), self.const(node.input[2])
            if packed is None or s is None:
                self.fail(node, "TernaryMatMul needs constant packed weights and scale")
                return None
            k = attrs["in_features"].i if "in_features" in attrs else packed.shape[1] * 4
            ternary = unpack_ternary(packed, k).astype(np.int8)
            scale = np.broadcast_to(np.asarray(s, np.float64).reshape(-1), (ternary.shape[0],)).copy()
            w = ternary * scale[:, None]
        elif node.op_type == "Gemm":
            w = self.const(node.input[1])
            if w is None or attrs.get("transA") and attrs["transA"].i:
                self.fail(node, "Gemm needs a constant weight and no transA")
                return None
            w = np.asarray(w, np.float64) * (attrs["alpha"].f if "alpha" in attrs else 1.0)
            w = w if "transB" in attrs and attrs["transB"].i else w.T
            if len(node.input) > 2 and node.input[2]:
                c = self.const(node.input[2])
                if c is None or bias is not None:
                    self.fail(node, "Gemm bias must be a constant")
                    return None
                bias = np.asarray(c, np.float64).reshape(-1) * (attrs["beta"].f if "beta" in attrs else 1.0)
        else:
            w = self.const(node.input[1])
            if w is None or w.ndim != 2:
                self.fail(node, "MatMul needs a constant 2-D weight")
                return None
            w = np.asarray(w, np.float64).T
        n_out = w.shape[0]
        b = np.zeros(n_out) if bias is None else np.broadcast_to(bias, (n_out,)).astype(np.float64)
        return FloatLayer(name, np.ascontiguousarray(w, np.float64), b.copy(), ternary=ternary, ternary_scale=scale)
