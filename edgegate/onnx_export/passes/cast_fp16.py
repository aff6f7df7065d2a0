"""Pass: a float32 model -> the same model computing in float16, float32 at its inputs and outputs.

Strongly typed TensorRT (TensorRT-RTX, TensorRT >= 11) takes precision from the tensor types of the
network, not from a builder flag, so an fp16 engine is built from an fp16 graph.

Matches the main graph and ``If``/``Loop``/``Scan`` subgraphs: float32 initializers, ``Constant``
and ``ConstantOfShape`` values and ``Cast(to=FLOAT)`` nodes become float16; each float32 graph input
is cast to float16 once where it enters and each float32 graph output is cast back to float32 where it
leaves, so callers feed and read the same types as before. Left in float32 by design:

* ``edgegate`` gating ops: their float inputs are cast to float32 before the call and their float
  outputs back to float16 after it, so routers, exit decisions and gates run in float32 (the gate
  precision policy, DESIGN.md §5) and their function bodies stay as exported.
* inputs that ONNX types as float32 only (``Resize`` scales). DequantizeLinear scales do become
  float16: a DequantizeLinear's output takes its scale's type, so integer weights dequantize to fp16.

Guarantees: graph input and output names, types and shapes are unchanged; the result passes
``onnx.checker.check_model(full_check=True)`` when the input did, and ONNX Runtime runs it. Float16
saturates at 65504: initializer values beyond it are clipped (infinities stay infinite).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgegate.onnx_export.passes._graph import copied, fresh_name, graphs, names_in_use

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
_FLOAT32_ONLY = {("Resize", 2)}  # (op, input index) typed tensor(float) by the ONNX schema
_FP16_MAX = float(np.finfo(np.float16).max)


def cast_fp16(model: onnx.ModelProto, keep_float_domains: tuple[str, ...] = ("edgegate",)) -> onnx.ModelProto:
    types = _value_types(model)
    out = copied(model)
    names = names_in_use(out.graph)
    pinned = _float32_only_inputs(out)
    float_outputs = {v.name for v in out.graph.output if v.type.tensor_type.elem_type == FLOAT}
    for g in graphs(out.graph):
        _convert_graph(g, types, names, pinned, keep_float_domains)
    _cast_io(out.graph, names, float_outputs)
    return out


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """name -> ONNX elem type of every typed value in every graph (after shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types: dict[str, int] = {}
    for g in graphs(inferred.graph):
        for v in [*g.input, *g.output, *g.value_info]:
            if v.type.HasField("tensor_type"):
                types[v.name] = v.type.tensor_type.elem_type
        for t in g.initializer:
            types[t.name] = t.data_type
    return types


def _float32_only_inputs(model: onnx.ModelProto) -> set[str]:
    """Initializer names that must stay float32: inputs the ONNX schema types as tensor(float)."""
    pinned = set()
    for g in graphs(model.graph):
        for n in g.node:
            for op, i in _FLOAT32_ONLY:
                if n.op_type == op and len(n.input) > i:
                    pinned.add(n.input[i])
    return pinned


def _half(t: onnx.TensorProto) -> onnx.TensorProto:
    a = numpy_helper.to_array(t)
    finite = np.isfinite(a)
    a = np.where(finite, np.clip(a, -_FP16_MAX, _FP16_MAX), a).astype(np.float16)
    return numpy_helper.from_array(a, t.name)


def _convert_graph(g: onnx.GraphProto, types: dict[str, int], names: set[str], pinned: set[str],
                   keep_float_domains: tuple[str, ...]) -> None:
    for i, t in enumerate(g.initializer):
        if t.data_type == FLOAT and t.name not in pinned:
            # DQ scales too: a DequantizeLinear's output takes its scale's type, and must be fp16 here.
            g.initializer[i].CopyFrom(_half(t))
    for node in list(g.node):
        if node.domain in keep_float_domains:
            _wrap_float32(g, node, types, names)
            continue
        if node.op_type == "ConstantOfShape" and not any(a.name == "value" for a in node.attribute):
            # The default value is a float32 zero.
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == FLOAT:
                a.i = HALF
            elif node.op_type in ("Constant", "ConstantOfShape") and a.name == "value" and a.t.data_type == FLOAT:
                a.t.CopyFrom(_half(a.t))
            elif node.op_type == "Constant" and a.name in ("value_float", "value_floats"):
                values = [a.f] if a.name == "value_float" else list(a.floats)
                arr = np.asarray(values, np.float16).reshape(() if a.name == "value_float" else (-1,))
                node.attribute.remove(a)
                node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(arr)))
                break
    # Subgraph outputs and intermediate annotations now carry fp16 values (graph I/O is fixed by _cast_io).
    for v in [*g.value_info, *g.output]:
        tt = v.type.tensor_type
        if tt.elem_type == FLOAT:
            tt.elem_type = HALF


def _wrap_float32(g: onnx.GraphProto, node: onnx.NodeProto, types: dict[str, int], names: set[str]) -> None:
    """Cast a float32-computing node's float inputs to float32 and its float outputs back to float16."""
    at = list(g.node).index(node)
    before, after = [], []
    for i, x in enumerate(node.input):
        if x and types.get(x) == FLOAT:
            y = fresh_name(names, f"{x}.float32")
            before.append(helper.make_node("Cast", [x], [y], name=y, to=FLOAT))
            node.input[i] = y
    for i, y in enumerate(node.output):
        if y and types.get(y) == FLOAT:
            x = fresh_name(names, f"{y}.float32")
            node.output[i] = x
            after.append(helper.make_node("Cast", [x], [y], name=fresh_name(names, f"{y}.to_fp16"), to=HALF))
    for j, n in enumerate(before):
        g.node.insert(at + j, n)
    at += len(before) + 1
    for j, n in enumerate(after):
        g.node.insert(at + j, n)


def _rename(g: onnx.GraphProto, old: str, new: str, *, outputs: bool) -> None:
    """Point every node input (and, with ``outputs``, node output) named ``old``, subgraphs included, at ``new``."""
    for sub in graphs(g):
        for n in sub.node:
            for field in (n.input, n.output) if outputs else (n.input,):
                for i, x in enumerate(field):
                    if x == old:
                        field[i] = new


def _cast_io(g: onnx.GraphProto, names: set[str], float_outputs: set[str]) -> None:
    """Keep the main graph's float32 inputs/outputs: cast each once at the boundary."""
    head, tail = [], []
    for v in g.input:
        if v.type.tensor_type.elem_type != FLOAT:
            continue
        half = fresh_name(names, f"{v.name}.fp16")
        _rename(g, v.name, half, outputs=False)
        head.append(helper.make_node("Cast", [v.name], [half], name=half, to=HALF))
    for v in g.output:
        if v.name not in float_outputs or v.name in {i.name for i in g.input}:
            continue
        v.type.tensor_type.elem_type = FLOAT
        half = fresh_name(names, f"{v.name}.fp16")
        _rename(g, v.name, half, outputs=True)
        tail.append(helper.make_node("Cast", [half], [v.name], name=fresh_name(names, f"{v.name}.to_float32"),
                                     to=FLOAT))
    for j, n in enumerate(head):
        g.node.insert(j, n)
    g.node.extend(tail)
