"""Pass: lower ``edgegate::TernaryMatMul`` to integer matmuls that ONNX Runtime's x86 CPU kernels run.

Matches every ``TernaryMatMul`` node (main graph and ``If``/``Loop``/``Scan`` subgraphs) whose packed
weight and scale are initializers. Each becomes explicit standard nodes: the op's 2-bit unpack
(BitShift by 0/2/4/6, BitwiseAnd 3, Gather through the op's code table ``TERNARY_LUT``) to int8
codes, transposed to [K, N]. ORT constant-folds that chain at session creation, so the file keeps the
packed uint8 initializer as the only copy of the weights: 2 bits a weight plus the scale, and ~70
bytes of decode tables per graph. The activation side, chosen per layer:

* ``per_token`` (BitNet layers): the input is the exporter's per-token absmax quantizer
  ``Div(Clip(Round(x * m), lo, hi), m)`` with -128 <= lo, hi <= 127. The integer codes feed
  ``MatMulInteger`` (as uint8 with zero point 128: ORT 1.32's s8s8 kernel was 35x slower) and
  y = int32 * scale / m. Exact: the same products as the float op, without float rounding.
* ``static`` (layer named in ``activation_scales``, which wins over per_token): symmetric int8
  QuantizeLinear -> DequantizeLinear on x and DequantizeLinear(axis=1) on the int8 [K, N] weight,
  which ORT fuses into ``MatMulIntegerToFloat``.
* ``dynamic`` (otherwise): ``DynamicQuantizeLinear`` -> ``MatMulInteger`` -> Cast -> Mul, which ORT
  fuses into ``DynamicQuantizeMatMul`` (uint8 per-tensor activations, re-derived each run).

Guarantees: no float MatMul reads a ternary weight in ORT's optimized graph; outputs equal the op's
numpy reference on the same quantized activations (per_token: within float rounding); the
``TernaryMatMul`` function is dropped once no node uses it; the quantizer's now unused ``Div`` is
removed. Layers are named by their module path (name scopes; else the packed initializer's prefix).
A key of ``activation_scales`` naming no ternary layer, or a node whose weights are not initializers,
raises ``ExportError``.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgegate.errors import ExportError
from edgegate.onnx_export.passes._graph import (
    copied,
    drop_unused_function,
    fresh_name,
    graphs,
    leaf_scope,
    names_in_use,
    replace_node,
    scoped_graphs,
    value_producers,
)
from edgegate.ops import DOMAIN, TERNARY_LUT

OP = "TernaryMatMul"
_SHARED = {  # decode constants, added once to each graph that needs them (~70 bytes, any model size)
    "ternary.lut": TERNARY_LUT,  # 2-bit code -> int8 weight: the op's own table
    "ternary.shifts": np.array([0, 2, 4, 6], np.uint8).reshape(4, 1, 1),  # 4 codes a byte, LSB first
    "ternary.mask": np.array(3, np.uint8),
    "ternary.zero": np.array([0], np.int64),
    "ternary.last_axis": np.array([-1], np.int64),
    "ternary.code_offset": np.array(128, np.float32),  # int8 code + 128 -> uint8 with zero point 128
    "ternary.code_zero_point": np.array(128, np.uint8),
}


def lower_ternary(model: onnx.ModelProto, activation_scales: Mapping[str, float] | None = None) -> onnx.ModelProto:
    scales = dict(activation_scales or {})
    out = copied(model)
    names = names_in_use(out.graph)
    seen: list[str] = []
    for graph, visible in scoped_graphs(out.graph):
        for node in [n for n in graph.node if n.domain == DOMAIN and n.op_type == OP]:
            seen.append(_lower(graph, node, visible, scales, names))
    unknown = sorted(set(scales) - set(seen))
    if unknown:
        raise ExportError(f"activation_scales names {unknown}, which are no TernaryMatMul layers of the model "
                          f"(found {seen or 'none'})")
    drop_unused_function(out, DOMAIN, OP)
    return out


def _lower(graph, node, visible: ChainMap, scales: dict[str, float], names: set[str]) -> str:
    x, packed_name, scale_name = node.input
    layer = leaf_scope(node) or packed_name.rpartition(".")[0] or packed_name
    if packed_name not in visible or scale_name not in visible:
        raise ExportError(f"ternary layer {layer}: packed weight and scale must be initializers to lower it "
                          "for the cpu target (they are computed tensors here)")
    packed = visible[packed_name]
    k = next((a.i for a in node.attribute if a.name == "in_features"), 0)
    if packed.data_type != TensorProto.UINT8 or len(packed.dims) != 2 or not 0 < k <= 4 * packed.dims[1]:
        raise ExportError(f"ternary layer {layer}: packed weight {packed_name} must be uint8 [N, ceil(K/4)] "
                          f"with in_features K={k}, got dims {list(packed.dims)}")
    new: list[onnx.NodeProto] = []

    def fresh(suffix: str) -> str:
        return fresh_name(names, f"{layer}.{suffix}")

    def emit(op: str, inputs: list[str], suffix: str, n_out: int = 1, **attrs) -> str | list[str]:
        outs = [fresh(suffix if n_out == 1 else f"{suffix}_{i}") for i in range(n_out)]
        new.append(helper.make_node(op, inputs, outs, name=outs[0], **attrs))
        return outs[0] if n_out == 1 else outs

    def const(suffix: str, value: np.ndarray) -> str:
        name = fresh(suffix)
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def shared(name: str) -> str:
        if name not in visible:
            graph.initializer.append(numpy_helper.from_array(_SHARED[name], name))
            visible.maps[0][name] = graph.initializer[-1]
        return name

    # Weight: packed uint8 [N, K/4] -> int8 codes [K, N]; constant-folded by ORT at session creation.
    # [4, N, K/4] -> [N, K/4, 4] -> [N, K]: broadcasting and Flatten need no shape tensors in the file.
    codes = emit("BitwiseAnd", [emit("BitShift", [packed_name, shared("ternary.shifts")], "shifted",
                                     direction="RIGHT"), shared("ternary.mask")], "codes_4nm")
    codes = emit("Flatten", [emit("Transpose", [codes], "codes_nm4", perm=[1, 2, 0])], "codes", axis=1)
    if k != 4 * packed.dims[1]:
        codes = emit("Slice", [codes, shared("ternary.zero"), const("k", np.array([k], np.int64)),
                               shared("ternary.last_axis")], "codes_k")
    w_int8 = emit("Gather", [shared("ternary.lut"), emit("Cast", [codes], "codes_i64", to=TensorProto.INT64)],
                  "weight_int8", axis=0)
    w_kn = emit("Transpose", [w_int8], "weight_int8_t", perm=[1, 0])
    y = node.output[0]

    quantizer = _per_token_quantizer(graph, x, visible)
    if layer in scales:
        s = const("input_scale", np.float32(scales[layer]))
        zp = const("input_zero_point", np.array(0, np.int8))
        xd = emit("DequantizeLinear", [emit("QuantizeLinear", [x, s, zp], "input_quantized"), s, zp],
                  "input_dequantized")
        w = emit("DequantizeLinear", [w_kn, scale_name], "weight_dequantized", axis=1)
        new.append(helper.make_node("MatMul", [xd, w], [y], name=fresh("matmul")))
    elif quantizer is not None:
        clip, m = quantizer
        u8 = emit("Cast", [emit("Add", [clip, shared("ternary.code_offset")], "codes_offset")],
                  "input_u8", to=TensorProto.UINT8)
        acc = emit("MatMulInteger", [u8, w_kn, shared("ternary.code_zero_point")], "acc")
        step = emit("Div", [scale_name, m], "output_step")  # scale / m: the accumulator's LSB per token
        new.append(helper.make_node("Mul", [emit("Cast", [acc], "acc_f", to=TensorProto.FLOAT), step], [y],
                                    name=fresh("dequantize")))
    else:
        xq, xs, xz = emit("DynamicQuantizeLinear", [x], "input_quantized", n_out=3)
        acc = emit("Cast", [emit("MatMulInteger", [xq, w_kn, xz], "acc")], "acc_f", to=TensorProto.FLOAT)
        new.append(helper.make_node("Mul", [acc, emit("Mul", [xs, scale_name], "output_step")], [y],
                                    name=fresh("dequantize")))
    replace_node(graph, node, new)
    if quantizer is not None and layer not in scales:
        _drop_if_unused(graph, x)
    return layer


def _per_token_quantizer(graph, x: str, visible: ChainMap) -> tuple[str, str] | None:
    """(clip output, m) when x = Div(Clip(Round(Mul(v, m)), lo, hi), m) with int8-range bounds."""
    producer = value_producers(graph)
    div = producer.get(x)
    if div is None or div.op_type != "Div":
        return None
    clip = producer.get(div.input[0])
    if clip is None or clip.op_type != "Clip" or len(clip.input) != 3:
        return None
    rnd = producer.get(clip.input[0])
    mul = producer.get(rnd.input[0]) if rnd is not None and rnd.op_type == "Round" else None
    if mul is None or mul.op_type != "Mul" or div.input[1] not in mul.input:
        return None
    bounds = [visible.get(b) for b in clip.input[1:]]
    if any(b is None for b in bounds):
        return None
    lo, hi = (float(numpy_helper.to_array(b)) for b in bounds)
    return (clip.output[0], div.input[1]) if -128 <= lo <= hi <= 127 else None


def _drop_if_unused(graph, name: str) -> None:
    readers = [n for g in graphs(graph) for n in g.node if name in n.input]
    if not readers and name not in {o.name for o in graph.output}:
        for n in list(graph.node):
            if list(n.output) == [name]:
                graph.node.remove(n)




