"""Pass: split a QDQ graph into regions by module scope, and turn chosen regions back to float.

``regions(model)`` matches the main graph's quantized compute nodes (nodes reading a DequantizeLinear
output or feeding a QuantizeLinear; Q/DQ nodes themselves excluded) and groups them by module path, cut
at the deepest scope level that gives at most ``max_regions`` groups (``layer1.0`` for a ResNet block,
``features.3`` for a MobileNet block, a Linear layer for an MLP). A node without a scope (one a pass
inserted) joins the region of the node that feeds it. Regions come in graph order.

Both key nodes by name: call ``with_node_names`` first.

``sparse_moe_switches`` / ``switch_branch_to_float``: the ``If(QMoE, int8 gather/scatter)`` nodes of sparse MoE
blocks (``lower_moe``), which live outside the regions, and one of their branches turned to float.

Linear layers that ``integer_kernels`` lowered to ``MatMulInteger`` (8-bit inputs, and A16W8's two byte
matmuls) read no DequantizeLinear: ``integer_layers`` finds each by its weight initializer and output node,
and they are quantized nodes too, in the region of their own module path. ``to_float`` turns such a layer
back into ``MatMul`` + ``Add`` on its dequantized weights (its input read in float).

``to_float(model, nodes)`` guarantees that the named nodes compute in float: their integer weights and
biases (DequantizeLinear of an initializer) become float initializers holding the dequantized values,
and every activation QuantizeLinear -> DequantizeLinear pair whose tensor a region node produces is
skipped for the readers inside the region (they read the float tensor). Readers outside the region keep
the pair, so a neighbouring INT8 region still gets its quantized input; tensors entering the region
keep their DequantizeLinear (the INT8 producer in front writes integers). Outputs stay within the
quantization error of the input model (float computation is at least as exact); graph inputs, outputs
and their names are unchanged; unread Q/DQ nodes and initializers are removed. The result passes
``onnx.checker.check_model(full_check=True)`` when the input did.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from edgegate.onnx_export.passes._graph import (
    copied,
    fresh_name,
    replace_node,
    value_names,
    value_producers,
    value_readers,
)
from edgegate.onnx_export.passes.insert_op_qdq import _scope
from edgegate.onnx_export.passes.integer_kernels import SUFFIX, lowered_names
from edgegate.onnx_export.passes.merge_qdq import _prune

MAX_REGIONS = 24
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _is_qdq(node: onnx.NodeProto) -> bool:
    return node.op_type in _QDQ and node.domain in ("", "ai.onnx")


def with_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which every main-graph node has a unique name (regions and to_float key nodes by name)."""
    out = copied(model)
    taken = {n.name for n in out.graph.node if n.name}
    seen: set[str] = set()
    for n in out.graph.node:
        if not n.name or n.name in seen:
            n.name = fresh_name(taken, f"{n.op_type}_node")
        seen.add(n.name)
    return out


@dataclass(frozen=True)
class IntegerLayer:
    """A Linear layer lowered to integer matmuls: its nodes, float input and output, and initializers."""

    path: str  # module path (the plan's layer name)
    nodes: tuple[str, ...]  # node names, graph order
    x: str
    y: str
    weight: str  # int8 [K, N]
    output_scale: str  # act_scale * w_scale[N]
    input_scale: str
    bias: str | None


def integer_layers(graph: onnx.GraphProto) -> list[IntegerLayer]:
    """The main graph's ``integer_kernels`` layers, in graph order."""
    inits = {t.name for t in graph.initializer}
    by_name = {n.name: n for n in graph.node if n.name}
    producer = value_producers(graph)
    out, end = [], f".{SUFFIX['output']}"
    for node in graph.node:
        names = lowered_names(node.name[:-len(end)]) if node.name.endswith(end) else None
        if names is None or names["weight"] not in inits or names["output_scale"] not in inits:
            continue
        first = by_name.get(names["input_quantized"]) or by_name.get(names["a16_div"])
        if first is None:
            continue
        x = first.input[0]
        chain, todo = {node.name}, [node]
        while todo:  # every node between x and the output: the lowering reads only x and initializers
            for i in todo.pop().input:
                src = producer.get(i)
                if i != x and src is not None and src.name not in chain:
                    chain.add(src.name)
                    todo.append(src)
        bias = names["bias"] if names["bias"] in inits and names["bias"] in node.input else None
        out.append(IntegerLayer(names["path"], tuple(n.name for n in graph.node if n.name in chain), x,
                                node.output[0], names["weight"], names["output_scale"], names["input_scale"], bias))
    return out


def quantized_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Main-graph compute nodes that read a DequantizeLinear output or feed a QuantizeLinear, and the nodes of
    integer-lowered layers."""
    producer = value_producers(graph)
    readers = value_readers(graph)
    lowered = {name for layer in integer_layers(graph) for name in layer.nodes}
    out = []
    for n in graph.node:
        if n.name in lowered:
            out.append(n)
            continue
        if _is_qdq(n):
            continue
        reads_dq = any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input)
        feeds_q = any(r.op_type == "QuantizeLinear" for o in n.output for r in readers.get(o, []))
        if reads_dq or feeds_q:
            out.append(n)
    return out


def regions(model: onnx.ModelProto, max_regions: int = MAX_REGIONS) -> list[tuple[str, list[str]]]:
    """[(region name, [node names])] of the quantized compute nodes, in graph order."""
    graph = model.graph
    nodes = quantized_nodes(graph)
    if not nodes:
        return []
    producer = value_producers(graph)
    own = {name: layer.path for layer in integer_layers(graph) for name in layer.nodes}
    path: dict[str, str] = {}
    for n in graph.node:  # graph order: a node's feeders are resolved before it
        sc = _scope(n)
        if n.name in own:  # a lowered layer's nodes carry no scope: its module path is its name
            path[n.name] = own[n.name]
        elif sc is not None:
            path[n.name] = sc[0]
        else:
            fed = [producer[i] for i in n.input if i in producer]
            path[n.name] = next((path[f.name] for f in fed if f.name in path), "")
    depth = max(p.count(".") + 1 if p else 0 for p in (path[n.name] for n in nodes))
    # The deepest scope level with at most max_regions groups, so blocks stay whole: ORT fuses across layers
    # of a block (Conv + Add + Relu in float), and a region cut inside a block cannot be timed on its own.
    # Consecutive groups are then merged (balanced by node count) down to max_regions.
    keys = [""] * len(nodes)  # no scopes at all: one region
    for level in range(depth, 0, -1):
        keys = [_cut(path[n.name], level) for n in nodes]
        if len(set(keys)) <= max_regions:
            break
    grouped: dict[str, list[str]] = {}
    for n, key in zip(nodes, keys, strict=True):
        grouped.setdefault(key, []).append(n.name)
    items = list(grouped.items())
    while len(items) > max_regions:  # merge the adjacent pair with the fewest nodes together
        i = min(range(len(items) - 1), key=lambda j: len(items[j][1]) + len(items[j + 1][1]))
        (a, na), (b, nb) = items[i], items[i + 1]
        items[i:i + 2] = [(f"{a.split('..')[0]}..{b.split('..')[-1]}", na + nb)]
    grouped = dict(items)
    return [(key or "(model)", names) for key, names in grouped.items()]


def _cut(path: str, level: int) -> str:
    return ".".join(path.split(".")[:level]) if path else ""


def to_float(model: onnx.ModelProto, node_names: list[str]) -> onnx.ModelProto:
    out = copied(model)
    graph = out.graph
    inside = set(node_names)
    names = set(value_names(graph))
    inits = {t.name: t for t in graph.initializer}
    for layer in integer_layers(graph):
        if inside.intersection(layer.nodes):
            inside.update(_float_layer(graph, layer, inits, names))
    producer = value_producers(graph)
    for node in graph.node:
        if node.name not in inside:
            continue
        for i, x in enumerate(node.input):
            dq = producer.get(x)
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
                node.input[i] = _dequantized(graph, dq, inits, names)
    # Activation pairs whose tensor the region produces (or a float producer or a graph input does):
    # readers inside the region read the float tensor. A tensor an INT8 node outside writes keeps its DQ.
    quantized = {n.name for n in quantized_nodes(graph)}
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        src = producer.get(q.input[0])
        if src is not None and src.name not in inside and src.name in quantized:
            continue
        dq_outputs = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]}
        for reader in graph.node:
            if reader.name in inside:
                for j, x in enumerate(reader.input):
                    if x in dq_outputs:
                        reader.input[j] = q.input[0]
    _prune(out)
    return out


def all_float(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every quantized node in float (``to_float`` of all of them) and every activation QuantizeLinear ->
    DequantizeLinear pair removed: the FP32 graph the INT8 one came from, with its weights rounded."""
    out = to_float(model, [n.name for n in quantized_nodes(model.graph)])
    graph = out.graph
    producer = value_producers(graph)
    inits = {t.name for t in graph.initializer}
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits]:
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        # An Identity keeps the DequantizeLinear's output name (a graph output may carry it).
        dq.op_type, dq.domain = "Identity", ""
        del dq.input[:]
        dq.input.append(q.input[0])
        del dq.attribute[:]
    _prune(out)
    return out


def _float_layer(graph: onnx.GraphProto, layer: IntegerLayer, inits: dict, names: set[str]) -> list[str]:
    """Replace ``layer``'s integer nodes by ``MatMul`` (+ ``Add``) on its dequantized weights, reading its input
    in float; the names of the new nodes."""
    w = numpy_helper.to_array(inits[layer.weight]).astype(np.float64)  # [K, N]
    w_scale = numpy_helper.to_array(inits[layer.output_scale]).astype(np.float64) / \
        float(numpy_helper.to_array(inits[layer.input_scale]))
    weight = fresh_name(names, f"{layer.path}.weight_float")
    graph.initializer.append(numpy_helper.from_array((w * w_scale.reshape(1, -1)).astype(np.float32), weight))
    product = fresh_name(names, f"{layer.path}.matmul_float") if layer.bias else layer.y
    nodes = [onnx.helper.make_node("MatMul", [layer.x, weight], [product], name=fresh_name(names, product))]
    if layer.bias:
        nodes.append(onnx.helper.make_node("Add", [product, layer.bias], [layer.y],
                                           name=fresh_name(names, f"{layer.path}.bias_float")))
    by_name = {n.name: n for n in graph.node}
    last = by_name[layer.nodes[-1]]
    for name in layer.nodes[:-1]:
        graph.node.remove(by_name[name])
    replace_node(graph, last, nodes)
    return [n.name for n in nodes]


def _dequantized(graph: onnx.GraphProto, dq: onnx.NodeProto, inits: dict, names: set[str]) -> str:
    """A float initializer with DequantizeLinear's value of a constant (per-tensor or per-axis)."""
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    zp = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 and dq.input[2] else 0.0
    if np.ndim(scale) == 1 and scale.size > 1:
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), np.reshape(zp, shape) if np.ndim(zp) else zp
    name = fresh_name(names, f"{dq.output[0]}.float")
    graph.initializer.append(numpy_helper.from_array(((q - zp) * scale).astype(np.float32), name))
    return name


def sparse_moe_switches(model: onnx.ModelProto) -> list[str]:
    """Names of the main-graph ``If`` nodes that ``lower_moe`` wrote for an int8 MoE block: ``QMoE`` in the
    then-branch (few tokens), the int8 gather/scatter form in the else-branch (many tokens)."""
    out = []
    for node in model.graph.node:
        then = next((a.g for a in node.attribute if a.name == "then_branch"), None)
        if node.op_type == "If" and then is not None and any(n.op_type == "QMoE" for n in then.node):
            out.append(node.name)
    return out


def switch_branch_to_float(model: onnx.ModelProto, node_name: str, branch: str = "else_branch") -> onnx.ModelProto:
    """A copy in which ``branch`` of the main-graph ``If`` node ``node_name`` computes in float: ``all_float``
    of that branch (its integer weights dequantized into float initializers, its activation Q/DQ pairs removed).
    Names the branch reads from the outer graph and its outputs are unchanged."""
    out = copied(model)
    node = next((n for n in out.graph.node if n.name == node_name), None)
    attr = None if node is None else next((a for a in node.attribute if a.name == branch), None)
    if attr is None:
        raise ValueError(f"no If node {node_name!r} with a {branch} in the main graph")
    body = onnx.ModelProto()  # the branch as a model of its own, for all_float (outer names stay references)
    body.graph.CopyFrom(attr.g)
    attr.g.CopyFrom(all_float(body).graph)
    return out
