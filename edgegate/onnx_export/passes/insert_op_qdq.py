"""Pass: quantize the outputs of a `QuantPlan`'s functional ops (residual Add, Concat, Mul, pooling...).

Matches each ``plan.ops`` entry to its node in the main graph: the ``ordinal``-th node whose module scope
(``pkg.torch.onnx.name_scopes``) is the op's scope and whose FX node name is one of the op kind's ATen
names (``edgegate.quantization.sites``). A scope whose node count of that kind differs from the calls the
torch forward made (``OpQuant.calls``) is skipped with a warning: the exporter merged or split nodes
there, and guessing would quantize the wrong tensor.

Guarantees: the op's output (or, with ``out_after_relu``, the output of the Relu that alone reads it)
goes through QuantizeLinear -> DequantizeLinear with the plan's uint8 scale and zero point, the
DequantizeLinear keeping the tensor's name, so every reader sees the quantized value. An average-pool
op that is a ``ReduceMean`` over axes (2, 3) of a 4-D tensor becomes ``GlobalAveragePool`` (the same
value), which ONNX Runtime fuses into ``QLinearGlobalAveragePool``; ``keepdims=0`` keeps its shape with
a Squeeze after the quantizer. The inputs of an op are quantized where they are produced, so ONNX Runtime
sees ``DQ -> Add -> Q`` and fuses ``QLinearAdd`` (likewise Concat, Mul, MaxPool on uint8). The result
passes ``onnx.checker.check_model(full_check=True)`` when the input did.
"""

from __future__ import annotations

import ast
import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgegate.onnx_export.passes._graph import copied, fresh_name, names_in_use
from edgegate.quantization.plan import OpQuant, QuantPlan
from edgegate.quantization.sites import OpKind, kind_of_fx

log = logging.getLogger(__name__)

SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def _scope(node: onnx.NodeProto) -> tuple[str, str] | None:
    """(module path, FX node name) of a node, from the exporter's name scopes; None when absent."""
    for p in node.metadata_props:
        if p.key == SCOPES_KEY:
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return None
            if isinstance(scopes, list) and len(scopes) >= 2:
                return str(scopes[-2]), str(scopes[-1])
    return None


def op_nodes(graph: onnx.GraphProto) -> dict[tuple[str, OpKind], list[onnx.NodeProto]]:
    """Main-graph nodes by (module scope, op kind), in graph order."""
    out: dict[tuple[str, OpKind], list[onnx.NodeProto]] = {}
    seen_fx: set[tuple[str, str]] = set()
    for node in graph.node:
        sc = _scope(node)
        if sc is None:
            continue
        kind = kind_of_fx(sc[1])
        # One FX node may export as several ONNX nodes: the first of them stands for the call.
        if kind is None or sc in seen_fx:
            continue
        seen_fx.add(sc)
        out.setdefault((sc[0], kind), []).append(node)
    return out


def insert_op_qdq(model: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    out = copied(model)
    if not plan.ops:
        return out
    graph = out.graph
    names = names_in_use(graph)
    found = op_nodes(graph)
    skipped: set[tuple[str, str]] = set()
    for op in plan.ops.values():
        kind = OpKind(op.kind)
        group = found.get((op.scope, kind), [])
        if len(group) != op.calls or op.ordinal >= len(group):
            skipped.add((op.scope, op.kind))
            continue
        node = group[op.ordinal]
        if kind is OpKind.AVG_POOL:
            node = _global_pool(graph, node, names, op)
        target = _target(graph, node, op)
        if target is None:
            skipped.add((op.scope, op.kind))
            continue
        _quantize_tensor(graph, target, op, names)
    for scope, kind in sorted(skipped):
        log.warning("functional %s op(s) in %s do not match the ONNX graph (nodes merged or split by the "
                    "exporter); left in float there", kind, scope or "the model's forward")
    return out


def _target(graph: onnx.GraphProto, node: onnx.NodeProto, op: OpQuant) -> str | None:
    y = node.output[0]
    if not op.out_after_relu:
        return y
    readers = [n for n in graph.node if y in n.input]
    if len(readers) != 1 or readers[0].op_type != "Relu" or y in {o.name for o in graph.output}:
        return None
    return readers[0].output[0]


def _reduce_axes(graph: onnx.GraphProto, node: onnx.NodeProto) -> list[int] | None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    if len(node.input) < 2 or not node.input[1]:
        return None
    init = {t.name: t for t in graph.initializer}
    if node.input[1] in init:
        return [int(a) for a in numpy_helper.to_array(init[node.input[1]]).reshape(-1)]
    producer = next((n for n in graph.node if node.input[1] in n.output and n.op_type == "Constant"), None)
    if producer is None:
        return None
    value = next((a for a in producer.attribute if a.name in ("value", "value_ints")), None)
    if value is None:
        return None
    arr = numpy_helper.to_array(value.t) if value.name == "value" else np.asarray(value.ints)
    return [int(a) for a in np.asarray(arr).reshape(-1)]


def _global_pool(graph: onnx.GraphProto, node: onnx.NodeProto, names: set[str], op: OpQuant) -> onnx.NodeProto:
    """ReduceMean over (2, 3) of a 4-D tensor -> GlobalAveragePool (+ Squeeze for keepdims=0)."""
    if node.op_type != "ReduceMean":
        return node
    axes = _reduce_axes(graph, node)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if axes is None or sorted(a % 4 for a in axes) != [2, 3]:
        return node
    keep = int(attrs.get("keepdims", 1))
    at = list(graph.node).index(node)
    y = node.output[0]
    pooled = y if keep else fresh_name(names, f"{op.key}.pooled")
    gap = helper.make_node("GlobalAveragePool", [node.input[0]], [pooled], name=fresh_name(names, f"{op.key}.gap"))
    gap.metadata_props.extend(node.metadata_props)
    graph.node.remove(node)
    graph.node.insert(at, gap)
    if not keep:
        axes_name = fresh_name(names, f"{op.key}.squeeze_axes")
        graph.initializer.append(numpy_helper.from_array(np.array([2, 3], np.int64), axes_name))
        graph.node.insert(at + 1, helper.make_node("Squeeze", [pooled, axes_name], [y],
                                                   name=fresh_name(names, f"{op.key}.squeeze")))
    return gap


def _quantize_tensor(graph: onnx.GraphProto, y: str, op: OpQuant, names: set[str]) -> None:
    """``y`` through QuantizeLinear -> DequantizeLinear; the DequantizeLinear takes the name ``y``."""
    producer = next(n for n in graph.node if y in n.output)
    signed = op.out_signed
    lo, hi = (-128, 127) if signed else (0, 255)
    if not (np.isfinite(op.out_scale) and op.out_scale > 0 and lo <= op.out_zero_point <= hi):
        log.warning("functional op %s: output scale %s / zero point %s unusable; left in float", op.key,
                    op.out_scale, op.out_zero_point)
        return
    base = f"{op.key}.output"
    scale, zp = fresh_name(names, f"{base}_scale"), fresh_name(names, f"{base}_zero_point")
    graph.initializer.append(numpy_helper.from_array(np.float32(op.out_scale), scale))
    graph.initializer.append(numpy_helper.from_array(np.array(op.out_zero_point, np.int8 if signed else np.uint8), zp))
    raw, q = fresh_name(names, f"{base}_float"), fresh_name(names, f"{base}_quantized")
    producer.output[list(producer.output).index(y)] = raw
    at = list(graph.node).index(producer)
    graph.node.insert(at + 1, helper.make_node("QuantizeLinear", [raw, scale, zp], [q], name=q))
    graph.node.insert(at + 2, helper.make_node("DequantizeLinear", [q, scale, zp], [y],
                                               name=fresh_name(names, f"{base}_dq")))
