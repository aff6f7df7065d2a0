"""Pass: rewrite the two constructs TensorRT's ONNX parser refuses into standard ops it builds.

Matches, in the main graph and in ``If``/``Loop``/``Scan`` subgraphs:

* ``edgegate::TernaryMatMul`` with initializer weights. Its function body unpacks the 2-bit weights
  with BitShift/BitwiseAnd, which TensorRT does not parse, and a body that casts int8 weights to float
  is rejected by the builder. Each node becomes ``MatMul(x, DequantizeLinear(W_int8[K, N], scale))``:
  the unpack runs here in numpy (``unpack_ternary``, the op's reference), the int8 codes {-1, 0, +1}
  are stored transposed and reach the MatMul only through DequantizeLinear (axis 1, per output
  channel; no axis for one scale), the form TensorRT builds as an int8 weight-only GEMM. The file
  stores 8 bits a weight instead of 2. The ``TernaryMatMul`` function is dropped once unused.
* ``NonZero`` on a 1-D bool tensor (the compaction form of early exit), when ``nonzero`` is True:
  TensorRT-RTX parses NonZero only through a plugin it does not ship. It becomes
  ``Unsqueeze(TopK(Where(m, n - arange(n), 0), k=ReduceSum(Cast(m))).indices, 0)``: the k positions
  with the largest scores, i.e. the set positions in ascending order, shaped [1, k] like NonZero's
  output. Other NonZero nodes are left for ``check`` to report.

Guarantees: outputs equal the input model's on every input (the rewrite of TernaryMatMul is exact in
float32 up to summation order); the result passes ``onnx.checker.check_model(full_check=True)`` when
the input did. A TernaryMatMul whose weight or scale is a computed tensor raises ``ExportError``.
"""

from __future__ import annotations

from collections import ChainMap

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgegate.errors import ExportError
from edgegate.onnx_export.passes._graph import (
    copied,
    drop_unused_function,
    drop_unused_initializers,
    fresh_name,
    graphs,
    leaf_scope,
    names_in_use,
    replace_node,
    scoped_graphs,
)
from edgegate.ops import DOMAIN, unpack_ternary

TERNARY = "TernaryMatMul"


def lower_trt(model: onnx.ModelProto, *, nonzero: bool = True) -> onnx.ModelProto:
    out = copied(model)
    names = names_in_use(out.graph)
    bool_1d = _bool_1d_values(out) if nonzero else set()
    replaced: set[str] = set()
    for graph, visible in scoped_graphs(out.graph):
        for node in list(graph.node):
            if node.domain == DOMAIN and node.op_type == TERNARY:
                replaced |= _lower_ternary(graph, node, visible, names)
            elif nonzero and node.domain in ("", "ai.onnx") and node.op_type == "NonZero" and node.input[0] in bool_1d:
                _lower_nonzero(graph, node, names)
    drop_unused_initializers(out, replaced)
    drop_unused_function(out, DOMAIN, TERNARY)
    return out


def _lower_ternary(graph: onnx.GraphProto, node: onnx.NodeProto, visible: ChainMap, names: set[str]) -> set[str]:
    """Replace one TernaryMatMul; returns the initializers it read (removed later if nothing else does)."""
    x, packed_name, scale_name = node.input
    layer = leaf_scope(node) or packed_name.rpartition(".")[0] or packed_name
    if packed_name not in visible or scale_name not in visible:
        raise ExportError(f"ternary layer {layer}: packed weight and scale must be initializers to build it for "
                          "TensorRT (they are computed tensors here); export the model in eval mode")
    packed = numpy_helper.to_array(visible[packed_name])
    scale = numpy_helper.to_array(visible[scale_name]).astype(np.float32)
    k = next((a.i for a in node.attribute if a.name == "in_features"), 0)
    if packed.dtype != np.uint8 or packed.ndim != 2 or not 0 < k <= 4 * packed.shape[1]:
        raise ExportError(f"ternary layer {layer}: packed weight {packed_name} must be uint8 [N, ceil(K/4)] with "
                          f"in_features K={k}, got {packed.dtype} {list(packed.shape)}")
    if scale.size not in (1, packed.shape[0]):
        raise ExportError(f"ternary layer {layer}: {scale.size} scales for {packed.shape[0]} output rows")
    codes = np.ascontiguousarray(unpack_ternary(packed, k).astype(np.int8).T)  # [K, N]
    w_name = fresh_name(names, f"{layer}.weight_quantized")
    s_name = fresh_name(names, f"{layer}.weight_scale")
    graph.initializer.append(numpy_helper.from_array(codes, w_name))
    per_channel = scale.size > 1
    graph.initializer.append(numpy_helper.from_array(scale.reshape(-1) if per_channel else scale.reshape(()),
                                                     s_name))
    w = fresh_name(names, f"{layer}.weight_dequantized")
    attrs = {"axis": 1} if per_channel else {}
    replace_node(graph, node, [
        helper.make_node("DequantizeLinear", [w_name, s_name], [w], name=w, **attrs),
        helper.make_node("MatMul", [x, w], list(node.output), name=fresh_name(names, f"{layer}.matmul")),
    ])
    return {packed_name, scale_name}


def _lower_nonzero(graph: onnx.GraphProto, node: onnx.NodeProto, names: set[str]) -> None:
    m = node.input[0]
    base = node.name or node.output[0]
    new: list[onnx.NodeProto] = []

    def emit(op: str, inputs: list[str], suffix: str, n_out: int = 1, **attrs) -> list[str]:
        outs = [fresh_name(names, f"{base}.{suffix}{i or ''}") for i in range(n_out)]
        new.append(helper.make_node(op, inputs, outs, name=outs[0], **attrs))
        return outs

    def const(suffix: str, value: np.ndarray) -> str:
        name = fresh_name(names, f"{base}.{suffix}")
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    zero, one = const("zero", np.array(0, np.int64)), const("one", np.array(1, np.int64))
    axis0 = const("axis0", np.array([0], np.int64))
    (n,) = emit("Squeeze", [emit("Shape", [m], "shape")[0]], "n")
    (rev,) = emit("Sub", [n, emit("Range", [zero, n, one], "arange")[0]], "rev")  # n..1: earlier ranks higher
    (score,) = emit("Where", [m, rev, zero], "score")
    (k,) = emit("ReduceSum", [emit("Cast", [m], "count", to=TensorProto.INT64)[0], axis0], "k", keepdims=1)
    _, idx = emit("TopK", [score, k], "topk", n_out=2, axis=0, largest=1, sorted=1)
    new.append(helper.make_node("Unsqueeze", [idx, axis0], list(node.output), name=fresh_name(names, base)))
    replace_node(graph, node, new)


def _bool_1d_values(model: onnx.ModelProto) -> set[str]:
    """Names of 1-D bool tensors, from ONNX shape inference (model-local functions included)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # an uninferable model keeps its NonZero nodes; check() then names them
        return set()
    out = set()
    for g in graphs(inferred.graph):
        for v in [*g.value_info, *g.input, *g.output]:
            t = v.type.tensor_type
            if t.elem_type == TensorProto.BOOL and t.HasField("shape") and len(t.shape.dim) == 1:
                out.add(v.name)
    return out

