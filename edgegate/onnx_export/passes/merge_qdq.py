"""Pass: one quantizer per tensor: drop requantizations that change nothing, merge duplicate Q/DQ nodes.

Matches, in every graph (subgraphs included, each on its own):

* ``DequantizeLinear(q, s, z) -> QuantizeLinear(·, s', z')`` with the same scale and zero point values
  and type: the QuantizeLinear gives ``q`` back exactly, so its readers read ``q`` (a layer's input
  quantizer behind an op's or a conv's output quantizer of the same calibration);
* two QuantizeLinear (or two DequantizeLinear) nodes reading the same tensor with equal scale and zero
  point: the second's readers read the first's output (two layers quantizing one input alike).

Guarantees: every graph output keeps its name and value (integer-exact: no rounding is added or
removed); nodes and initializers nothing reads any more are removed. ONNX Runtime then sees each tensor
quantized once, the form its QDQ fusions (QLinearConv, QLinearAdd, uint8 MaxPool) expect.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from edgegate.onnx_export.passes._graph import drop_unused_initializers, graphs, value_producers

_QDQ = ("QuantizeLinear", "DequantizeLinear")


def merge_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    consts = _constants(out)
    changed = True
    while changed:  # each round rewires at least one reader and prunes what it orphaned: it terminates
        changed = False
        for g in graphs(out.graph):
            changed |= _merge(g, consts)
        _prune(out)
    return out


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for g in graphs(model.graph) for t in g.initializer}


def _params(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> tuple | None:
    """(scale bytes, zero point bytes, zero point dtype, axis) when both are constants; None otherwise."""
    if len(node.input) < 3 or node.input[1] not in consts or node.input[2] not in consts:
        return None
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    s, z = consts[node.input[1]], consts[node.input[2]]
    return (s.astype(np.float32).tobytes(), s.shape, z.tobytes(), str(z.dtype), axis if s.size > 1 else None)


def _rewire(g: onnx.GraphProto, old: str, new: str) -> None:
    for sub in graphs(g):
        for n in sub.node:
            for i, x in enumerate(n.input):
                if x == old:
                    n.input[i] = new


def _merge(g: onnx.GraphProto, consts: dict[str, np.ndarray]) -> bool:
    outputs = {o.name for o in g.output}
    producer = value_producers(g)
    changed = False
    first: dict[tuple, str] = {}
    for node in list(g.node):
        if node.op_type not in _QDQ or node.domain not in ("", "ai.onnx"):
            continue
        params = _params(node, consts)
        if params is None or node.output[0] in outputs:
            continue
        src = producer.get(node.input[0])
        if (node.op_type == "QuantizeLinear" and src is not None and src.op_type == "DequantizeLinear"
                and _params(src, consts) == params):
            _rewire(g, node.output[0], src.input[0])  # Q(DQ(q)) == q
            changed = True
            continue
        key = (node.op_type, node.input[0], params)
        if key in first:
            _rewire(g, node.output[0], first[key])
            changed = True
        else:
            first[key] = node.output[0]
    return changed


def _prune(model: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nothing reads (repeatedly), then unread initializers."""
    while True:
        used = ({i for g in graphs(model.graph) for n in g.node for i in n.input}
                | {o.name for g in graphs(model.graph) for o in g.output})
        removed = False
        for g in graphs(model.graph):
            outs = {o.name for o in g.output}
            keep = [n for n in g.node if n.op_type not in _QDQ or any(o in used or o in outs for o in n.output)]
            if len(keep) != len(g.node):
                del g.node[:]
                g.node.extend(keep)
                removed = True
        if not removed:
            break
    drop_unused_initializers(model)
