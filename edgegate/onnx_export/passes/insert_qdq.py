"""Pass: put a `QuantPlan`'s QuantizeLinear/DequantizeLinear pairs into a float export (QDQ form).

Matches, in the main graph and in ``If``/``Loop``/``Scan`` subgraphs, the float node of every plan
layer: a ``Conv`` or ``Gemm`` (transA=0, transB=1) whose weight is the initializer
``<module path>.weight`` (a wrapper's prefix such as ``net.`` is allowed), and a ``MatMul`` (a Linear
on 3-D input, whose weight the exporter constant-folds to an unnamed transposed initializer) found by
its module name scope or, inside subgraphs where scopes are cut, by its weight values (W.T within a
few quantization steps of the plan's dequantized weight). Nodes of ``plan.float_layers`` are left as
they are.

Guarantees: each matched node reads its activation through QuantizeLinear -> DequantizeLinear (qdq_form
``cpu``: the plan's uint8/int8 type and zero point, which ONNX Runtime x86 fuses into
QLinearConv/QGemm/MatMulIntegerToFloat; the ``symmetric`` form: int8 with zero point 0) and its weight as an
int8 initializer ``<layer>.weight_quantized`` with a per-output-channel scale and zero point 0
through DequantizeLinear (axis 0; axis 1 for MatMul). Biases sit on brevitas' Int32Bias grid
(round(b / (act_scale * weight_scale[c]))): the ``asymmetric`` form stores a Conv/Gemm bias as that int32
behind DequantizeLinear (fused into QLinearConv/QGemm); a MatMul's bias Add (where ORT fuses no bias
DQ) and every bias of the ``symmetric`` form (TensorRT rejects an int32 bias behind DequantizeLinear) get the
float values that DequantizeLinear would give, ``<layer>.bias_rounded``. A layer with an output
quantizer (every Conv of a calibrated cpu plan) writes its output through QuantizeLinear ->
DequantizeLinear of the same activation type, the DequantizeLinear keeping the old output name: ORT
x86 fuses DQ -> Conv -> Q into QLinearConv, also where the output feeds a float op (a gate's Mul, a
residual Add).
New nodes sit in the graph of the node they feed, new initializers next to them; replaced float
weights and biases that nothing reads any more are removed. A plan layer that matches no node, or
more than one candidate, raises ``ExportError`` naming it. The result passes
``onnx.checker.check_model(full_check=True)`` when the input did.
"""

from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgegate.errors import ExportError
from edgegate.fs import scratch_write
from edgegate.onnx_export.passes._graph import (
    drop_unused_initializers,
    fresh_name,
    graphs,
    insert_nodes,
    leaf_scope,
    names_in_use,
    scoped_nodes,
)
from edgegate.onnx_export.passes.insert_op_qdq import insert_op_qdq
from edgegate.onnx_export.passes.integer_kernels import lower_integer
from edgegate.onnx_export.passes.merge_qdq import merge_qdq
from edgegate.quantization.plan import LayerKind, LayerQuant, QdqForm, QuantPlan

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
MATCH_REL_ERROR = 0.1  # a MatMul weight is the plan's layer if ||W.T - dequant(plan)|| <= 10 % of its norm
_INT32 = np.iinfo(np.int32)


@dataclass(eq=False)  # identity: sites are compared by which node they are, never by content
class _Site:
    layer: LayerQuant | None  # None while a MatMul is still a candidate
    graph: onnx.GraphProto
    node: onnx.NodeProto
    visible: ChainMap  # name -> TensorProto, this graph's initializers and its outer scopes'


def insert_qdq(model: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    out = _lower(model, plan, frozenset())
    if plan.qdq_form is QdqForm.ASYMMETRIC:
        # Linear layers that ORT would leave in float become explicit integer matmuls instead.
        left = frozenset(float_layers_after_ort(out) & set(plan.layers))
        if left:
            out = _lower(model, plan, left)
    return out


def _lower(model: onnx.ModelProto, plan: QuantPlan, integer: frozenset[str]) -> onnx.ModelProto:
    """Layers, then functional ops (``insert_op_qdq``), then one quantizer per tensor (``merge_qdq``)."""
    out = _insert(model, plan, integer)
    if plan.ops or any(q.out_after_relu for q in plan.layers.values()):
        # Functional ops and ReLU-fused outputs share one quantizer per tensor with the layers that read them.
        out = merge_qdq(insert_op_qdq(out, plan))
    return out


def _insert(model: onnx.ModelProto, plan: QuantPlan, integer: frozenset[str]) -> onnx.ModelProto:
    clash = sorted(set(plan.layers) & set(plan.float_layers))
    if clash:
        raise ExportError(f"layers {clash} are both quantized and float in the plan; keep each in one list")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = names_in_use(out.graph)
    sites, matmuls = [], []
    for graph, node, visible in scoped_nodes(out.graph):
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        if node.op_type in ("Conv", "Gemm"):
            layer = _layer_of_weight(node.input[1], plan)
            if layer is not None:
                sites.append(_Site(layer, graph, node, visible))
        elif node.op_type == "MatMul" and node.input[1] in visible and len(visible[node.input[1]].dims) == 2:
            matmuls.append(_Site(None, graph, node, visible))
    found = {s.layer.name for s in sites}
    sites += _match_matmuls(matmuls, [q for n, q in plan.layers.items() if n not in found], plan)
    missing = sorted(set(plan.layers) - {s.layer.name for s in sites})
    if missing:
        raise ExportError(f"plan layer(s) {missing} match no Conv/Gemm/MatMul of the ONNX graph (no initializer "
                          "'<layer>.weight', no MatMul with its weights); was the plan made for this model?")
    replaced: set[str] = set()
    for site in sites:
        _rewrite(site, plan.qdq_form, names, replaced, site.layer.name in integer)
    drop_unused_initializers(out, replaced)
    return out


# --------------------------------------------------------------------------------------------- matching


def _layer_of_weight(name: str, plan: QuantPlan) -> LayerQuant | None:
    """The plan layer whose ``<path>.weight`` this is: the longest path that ends the name; None if float."""
    path = plan.path_of_weight(name)
    return None if path is None else plan.layers.get(path)




def _scope_is(scope: str, path: str) -> bool:
    return bool(scope) and (scope == path or scope.endswith("." + path))


def _match_matmuls(candidates: list[_Site], layers: list[LayerQuant], plan: QuantPlan) -> list[_Site]:
    """Pair MatMul nodes with LINEAR plan layers: by module scope, else by unique weight values."""
    out = []
    free = [c for c in candidates if not any(_scope_is(leaf_scope(c.node), f) for f in plan.float_layers)]
    for q in layers:
        if q.kind is not LayerKind.LINEAR or q.weight_int.ndim != 2:
            continue
        shape = tuple(q.weight_int.shape[::-1])
        fits = [c for c in free if tuple(c.visible[c.node.input[1]].dims) == shape]
        scoped = [c for c in fits if _scope_is(leaf_scope(c.node), q.name)]
        dq = q.dequantized_weight().T
        err = {id(c): _rel_error(numpy_helper.to_array(c.visible[c.node.input[1]]), dq) for c in scoped or fits}
        close = [c for c in (scoped or fits) if err[id(c)] <= MATCH_REL_ERROR]
        if scoped and len(close) < len(scoped):
            raise ExportError(f"layer {q.name}: its MatMul weights differ from the plan's by "
                              f"{max(err.values()):.0%}; recalibrate the plan for this model")
        weights = {c.node.input[1] for c in close}
        if not scoped and len(weights) > 1:
            raise ExportError(f"layer {q.name}: {len(weights)} MatMul weights match its values; cannot tell "
                              "which is the layer (export with name scopes or give the layers distinct weights)")
        out += [_Site(q, c.graph, c.node, c.visible) for c in close]
        free = [c for c in free if c not in close]
    return out


def _rel_error(w: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(w - ref) / max(np.linalg.norm(ref), 1e-12))


# --------------------------------------------------------------------------------------------- rewriting


def _rewrite(site: _Site, qdq_form: QdqForm, names: set[str], replaced: set[str], integer: bool = False) -> None:
    q, node, graph = site.layer, site.node, site.graph
    assert q is not None
    matmul = node.op_type == "MatMul"
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transB", 0) != 1 or attrs.get("transA", 0) != 0:
            raise ExportError(f"layer {q.name}: Gemm with transA={attrs.get('transA', 0)}, "
                              f"transB={attrs.get('transB', 0)}; only x @ W^T (transB=1) is supported")
    w_float = site.visible[node.input[1]]
    want = q.weight_int.shape[::-1] if matmul else q.weight_int.shape
    if tuple(w_float.dims) != tuple(want):
        raise ExportError(f"layer {q.name}: ONNX weight {node.input[1]} has shape {list(w_float.dims)}, the plan "
                          f"{list(q.weight_int.shape)}; was the plan made for this model?")
    if not matmul:  # MatMul weights were matched by value already
        err = _rel_error(numpy_helper.to_array(w_float).astype(np.float32), q.dequantized_weight())
        if err > MATCH_REL_ERROR:
            # e.g. a BatchNorm the exporter folded into the conv while the plan was calibrated without it
            raise ExportError(f"layer {q.name}: ONNX weight {node.input[1]} differs from the plan's by {err:.0%}; "
                              "calibrate the model that is exported (BatchNorm folded)")

    def fresh(suffix: str) -> str:
        return fresh_name(names, f"{q.name}.{suffix}")

    def init(suffix: str, value: np.ndarray) -> str:
        name = fresh(suffix)
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    if not matmul and q.bias is not None and (len(node.input) < 3 or not node.input[2]):
        # The exporter drops an all-zero bias; bias correction may have given the quantized layer one.
        name = init("bias", np.zeros(q.weight_int.shape[0], np.float32))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
        site.visible.maps[0][name] = graph.initializer[-1]
    if q.out_scale is not None or q.out_zero_point is not None:
        _quantize_output(site, qdq_form, fresh, init)
    if q.act_bits == 16 or integer:
        _rewrite_integer(site, qdq_form, fresh, init, replaced)
        return

    new_nodes = []

    def dq(x: str, scale: str, zp: str | None, suffix: str, **attrs: int) -> str:
        y = fresh(suffix)
        new_nodes.append(helper.make_node("DequantizeLinear", [x, scale] + ([zp] if zp else []), [y],
                                          name=y, **attrs))
        return y

    # Activation: Q -> DQ
    signed = q.act_signed or qdq_form is QdqForm.SYMMETRIC
    if qdq_form is QdqForm.SYMMETRIC and q.act_zero_point != 0:
        raise ExportError(f"layer {q.name}: the symmetric form needs activation zero point 0, the plan has "
                          f"{q.act_zero_point}; calibrate with symmetric activations")
    lo, hi = (-128, 127) if signed else (0, 255)
    if not (np.isfinite(q.act_scale) and q.act_scale > 0 and np.all(np.asarray(q.weight_scale) > 0)):
        raise ExportError(f"layer {q.name}: scales must be finite and > 0 (activation {q.act_scale}); "
                          "was the layer calibrated?")
    if not lo <= q.act_zero_point <= hi:
        raise ExportError(f"layer {q.name}: activation zero point {q.act_zero_point} is outside [{lo}, {hi}]")
    a_scale = init("input_scale", np.float32(q.act_scale))
    a_zp = init("input_zero_point", np.array(q.act_zero_point, np.int8 if signed else np.uint8))
    xq = fresh("input_quantized")
    new_nodes.append(helper.make_node("QuantizeLinear", [node.input[0], a_scale, a_zp], [xq], name=xq))
    node.input[0] = dq(xq, a_scale, a_zp, "input_dequantized")

    # Weight: int8 per output channel -> DQ
    channels = q.weight_int.shape[0]
    w_scale = np.asarray(q.weight_scale, np.float32).reshape(-1)
    if w_scale.size not in (1, channels):
        raise ExportError(f"layer {q.name}: {w_scale.size} weight scales for {channels} output channels")
    per_tensor = w_scale.size == 1  # one scale: a scalar DequantizeLinear, no axis
    w_q = init("weight_quantized", q.weight_int.astype(np.int8).T if matmul else q.weight_int.astype(np.int8))
    w_s = init("weight_scale", w_scale[0] if per_tensor else w_scale)
    w_z = init("weight_zero_point", np.zeros_like(w_scale[0] if per_tensor else w_scale, np.int8))
    replaced.add(node.input[1])
    node.input[1] = dq(w_q, w_s, w_z, "weight_dequantized", **({} if per_tensor else {"axis": 1 if matmul else 0}))

    # Bias on brevitas' Int32Bias grid: int32 behind DQ (cpu Conv/Gemm), else the float values of that grid
    bias_scale = np.broadcast_to(np.float32(q.act_scale) * w_scale, (channels,)).astype(np.float32)
    if qdq_form is QdqForm.ASYMMETRIC and not matmul and len(node.input) > 2 and node.input[2] in site.visible:
        b = _bias_values(q, site.visible[node.input[2]])
        replaced.add(node.input[2])
        b_q = init("bias_quantized", int32_bias(b, bias_scale))
        node.input[2] = dq(b_q, init("bias_scale", bias_scale), None, "bias_dequantized", axis=0)
    elif matmul:
        _round_matmul_bias(site, q, bias_scale, init, replaced)
    elif len(node.input) > 2 and node.input[2] in site.visible:  # trt: float, on the same int32 grid
        replaced.add(node.input[2])
        node.input[2] = init("bias_rounded", _on_grid(_bias_values(q, site.visible[node.input[2]]), bias_scale))
    insert_nodes(graph, node, new_nodes)


def _quantize_output(site: _Site, qdq_form: QdqForm, fresh, init) -> None:
    """The layer's output through QuantizeLinear -> DequantizeLinear, in the activation type of its input
    (uint8 asymmetric for cpu, int8 with zero point 0 for trt). The DequantizeLinear produces the node's
    old output name, so every consumer (and a graph output of that name) reads the dequantized value."""
    q, node, graph = site.layer, site.node, site.graph
    signed = q.act_signed or qdq_form is QdqForm.SYMMETRIC
    lo, hi = (-128, 127) if signed else (0, 255)
    if q.out_scale is None or q.out_zero_point is None:
        raise ExportError(f"layer {q.name}: output quantizer has scale {q.out_scale} and zero point "
                          f"{q.out_zero_point}; give both or neither")
    if not (np.isfinite(q.out_scale) and q.out_scale > 0):
        raise ExportError(f"layer {q.name}: output scale must be finite and > 0, the plan has {q.out_scale}; "
                          "was the layer calibrated?")
    if not lo <= q.out_zero_point <= hi or (qdq_form is QdqForm.SYMMETRIC and q.out_zero_point != 0):
        raise ExportError(f"layer {q.name}: output zero point {q.out_zero_point} is outside "
                          f"[{lo}, {hi}]" + (" (the symmetric form needs 0)" if qdq_form is QdqForm.SYMMETRIC else ""))
    scale = init("output_scale", np.float32(q.out_scale))
    zp = init("output_zero_point", np.array(q.out_zero_point, np.int8 if signed else np.uint8))
    if q.out_after_relu:
        # The quantizer was calibrated after the ReLU that alone reads the conv (zero point 0): ORT folds
        # Relu -> QuantizeLinear into the QLinearConv in front of it.
        readers = [n for n in graph.node if node.output[0] in n.input]
        if len(readers) != 1 or readers[0].op_type != "Relu":
            raise ExportError(f"layer {q.name}: the plan quantizes its output after a ReLU, but the ONNX graph "
                              f"feeds {[n.op_type for n in readers]}; was the plan made for this model?")
        node = readers[0]
    y, raw, yq = node.output[0], fresh("output_float"), fresh("output_quantized")
    node.output[0] = raw
    insert_nodes(graph, node, [helper.make_node("QuantizeLinear", [raw, scale, zp], [yq], name=yq),
                               helper.make_node("DequantizeLinear", [yq, scale, zp], [y], name=fresh("output_dq"))],
                 after=True)


def float_layers_after_ort(model: onnx.ModelProto) -> set[str]:
    """Linear plan layers that ONNX Runtime's CPU graph optimizer leaves as float Gemm/MatMul (no QGemm).

    Read off the optimized graph: a float op still reading ``<layer>.weight_dequantized``. ORT x86
    fuses DQ -> Gemm only in some neighbourhoods (e.g. not DQ -> Gemm -> Relu into float consumers),
    so the pass asks the real runtime rather than guessing its rules.
    """
    import tempfile
    from pathlib import Path

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.log_severity_level = 3
    # Nothing runs: the weights need no packing, and ORT reads the model from a file, not from a copy of its
    # bytes held beside its own (export peak memory).
    so.add_session_config_entry("session.disable_prepacking", "1")
    with tempfile.TemporaryDirectory(prefix="edgegate-ort-") as tmp:
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        with scratch_write(Path(tmp) / "model.onnx"):
            onnx.save_model(model, str(Path(tmp) / "model.onnx"))
        ort.InferenceSession(str(Path(tmp) / "model.onnx"), so, providers=["CPUExecutionProvider"])
        optimized = onnx.load(so.optimized_model_filepath)
    suffix = ".weight_dequantized"
    return {n.input[1][: -len(suffix)] for g in graphs(optimized.graph) for n in g.node
            if n.op_type in _FLOAT_MATMULS and len(n.input) > 1 and n.input[1].endswith(suffix)}


# Convs are not rewritten: ConvInteger is ORT's slow path (a gated CNN ran 17x slower than FP32 with it).
# A cpu Conv carries an output quantizer instead, so ORT fuses it into QLinearConv wherever its output goes.
_FLOAT_MATMULS = {"Gemm", "FusedGemm", "MatMul", "FusedMatMul"}


def _rewrite_integer(site: _Site, qdq_form: QdqForm, fresh, init, replaced: set[str]) -> None:
    """A Linear as explicit integer matmuls: A16W8 (byte-sliced), or an 8-bit layer ORT would not fuse (cpu)."""
    q, node = site.layer, site.node
    if qdq_form is not QdqForm.ASYMMETRIC:
        raise ExportError(f"layer {q.name}: 16-bit activations are lowered for the asymmetric form "
                          f"only; the {qdq_form} form keeps A16W8 layers in float")
    w_scale = np.asarray(q.weight_scale, np.float32).reshape(-1)
    bias_scale = np.broadcast_to(np.float32(q.act_scale) * w_scale, (q.weight_int.shape[0],)).astype(np.float32)
    matmul = node.op_type == "MatMul"
    bias = None
    if not matmul and len(node.input) > 2 and node.input[2] in site.visible:
        bias = _on_grid(_bias_values(q, site.visible[node.input[2]]), bias_scale)
        replaced.add(node.input[2])
    replaced.add(node.input[1])
    if matmul:
        _round_matmul_bias(site, q, bias_scale, init, replaced)
    lower_integer(q, site.graph, node, fresh, init, bias)


def int32_bias(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Bias on the accumulator grid: round(b / (act_scale * weight_scale[c])), saturated to int32."""
    q = np.round(bias.astype(np.float32) / scale.astype(np.float32))
    return np.clip(q, _INT32.min, _INT32.max).astype(np.int32)


def _on_grid(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float values DequantizeLinear(int32 bias) gives: brevitas' Int32Bias, without the int32 tensor."""
    return (int32_bias(bias, scale).astype(np.float32) * scale).astype(np.float32)


def _bias_values(q: LayerQuant, tensor: onnx.TensorProto) -> np.ndarray:
    """The plan's float bias (what calibration saw), else the graph's; both [out_channels]."""
    b = numpy_helper.to_array(tensor) if q.bias is None else q.bias
    b = np.asarray(b, np.float32).reshape(-1)
    if b.size != q.weight_int.shape[0]:
        raise ExportError(f"layer {q.name}: bias has {b.size} values for {q.weight_int.shape[0]} output channels")
    return b


def _round_matmul_bias(site: _Site, q: LayerQuant, scale: np.ndarray, init, replaced: set[str]) -> None:
    """MatMul -> Add(bias): store the bias as the float values DequantizeLinear(int32) would give."""
    out = site.node.output[0]
    adds = [n for n in site.graph.node if out in n.input]
    if len(adds) != 1 or adds[0].op_type != "Add":
        return
    add = adds[0]
    other = 1 if add.input[0] == out else 0
    tensor = site.visible.get(add.input[other])
    if tensor is None or int(np.prod(tensor.dims)) != scale.size:
        return
    b = _bias_values(q, tensor)
    replaced.add(add.input[other])
    add.input[other] = init("bias_rounded", _on_grid(b, scale))


# --------------------------------------------------------------------------------------------- graphs






