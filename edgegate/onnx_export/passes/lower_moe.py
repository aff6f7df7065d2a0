"""Pass: lower each ``RoutedExperts`` node (a MoE block's FFN experts, sparse export form) for ONNX Runtime's CPU.

Matches every node ``edgegate.moe::RoutedExperts`` (main graph and ``If``/``Loop``/``Scan`` subgraphs): inputs
``x`` [T, d], the dense routing weights ``w`` [T, E] >= 0 (0 where a token is not routed) and per expert its
``w1, w3, w2`` weights (then ``b1, b3, b2`` when ``bias``), initializers named ``<expert path>.w1.weight``...;
attributes ``act``, ``bias``, ``k`` (at most ``k`` non-zero weights per row). Each becomes:

* *per-expert gather/scatter* (always the float form): per expert ``NonZero(w[:, e])`` -> ``GatherND`` the
  rows -> the expert (``Gemm`` nodes reading the original weight initializers, so ``insert_qdq`` quantizes
  them like any Linear) -> times the weight -> ``ScatterND`` (add) into the output. Only routed rows of
  non-zero weight are computed; an expert that no row chose runs on an empty batch.
* with a ``plan`` that quantizes every expert projection to int8, a SiLU (SwiGLU) activation and a
  power-of-two block of 16..128 dividing ``d`` and the hidden width: ``If(tokens <= qmoe_max_tokens)``
  whose then-branch is ``QMoE`` (``com.microsoft``, ONNX Runtime's own MoE kernel) and whose else-branch is
  the gather/scatter form (int8 after ``insert_qdq``). Measured on x86 (1 thread, d 512, hidden 2048, 8
  experts, top-2): ``QMoE`` runs 1 token in ~0.5x the time of the int8 gather/scatter form and 64 tokens in
  ~2x, crossing near 12 tokens; the switch keeps the faster of the two, at the price of a second int8 copy
  of the expert weights. ``QMoE`` weights: the plan's int8 codes + 128 as uint8 with ORT's default zero
  point 128, ``w1``/``w3`` rows interleaved (``swiglu_fusion=1``), the per-channel scales repeated over the
  blocks (the same values block-wise). Routing: ``w`` is both ``router_probs`` (the kernel's top-k of
  its softmax picks the non-zero slots) and ``router_weights`` (the mixing weights;
  ``normalize_routing_weights=0``), so the decision is the graph's own ``TopKGate`` and the kernel skips
  slots of weight 0 (it skips every weight <= 0, hence the contract ``w >= 0``). The kernel quantizes its activations
  itself (int8 per block of a row), so that branch does not use the plan's activation scales.

Guarantees: no ``RoutedExperts`` node is left; outputs equal the op's torch implementation
(``edgegate.nn.routed_experts``) to float rounding in the float form, and within int8 weight and
activation rounding in the ``QMoE`` branch; graphs with ``QMoE`` import ``com.microsoft`` version 1; float
expert weights that nothing reads any more are removed. A node whose parameters are not initializers,
or whose input count does not match its attributes, raises ``ExportError``.
"""

from __future__ import annotations

import logging
from collections import ChainMap
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgegate.errors import ExportError
from edgegate.onnx_export.passes._graph import (
    copied,
    drop_unused_initializers,
    fresh_name,
    graphs,
    names_in_use,
    replace_node,
    scoped_graphs,
)
from edgegate.quantization.plan import LayerKind, LayerQuant, QuantPlan

log = logging.getLogger(__name__)

DOMAIN, OP, VERSION = "edgegate.moe", "RoutedExperts", 1
MS_DOMAIN = "com.microsoft"
QMOE_BLOCKS = (128, 64, 32, 16)  # largest first: ORT's block-wise 8-bit kernel (measured fastest at 128)
QMOE_ACT = "silu"
QMOE_MAX_TOKENS = 8  # QMoE up to this many tokens a call, int8 gather/scatter above (see the module doc)
_WEIGHT_OFFSET = 128  # int8 code -> uint8 with QMoE's default 8-bit zero point


def register_schema() -> None:
    """The op's ONNX schema (one variadic input list: ``x, w, params...``), for onnx.checker and onnxscript."""
    from onnx import defs

    if defs.has(OP, DOMAIN):
        return
    s = defs.OpSchema
    defs.register_schema(s(
        OP, DOMAIN, VERSION, doc="A MoE block's routed FFN experts (sparse export form); lowered for the cpu target.",
        inputs=[s.FormalParameter("inputs", "T", param_option=s.FormalParameterOption.Variadic)],
        outputs=[s.FormalParameter("y", "T")], type_constraints=[("T", ["tensor(float)"], "")],
        attributes=[s.Attribute("act", s.AttrType.STRING, "expert activation (silu, gelu, gelu_tanh, relu)"),
                    s.Attribute("bias", s.AttrType.INT, "1: params carry b1, b3, b2 after the weights"),
                    s.Attribute("k", s.AttrType.INT, "at most k non-zero routing weights per row")]))


@dataclass(frozen=True)
class _Experts:
    """One RoutedExperts node, read: its tensors by role, per expert."""

    x: str
    w: str
    weights: tuple[tuple[str, str, str], ...]  # (w1, w3, w2) initializer names per expert
    biases: tuple[tuple[str, str, str], ...] | None
    act: str
    k: int


def lower_routed_experts(model: onnx.ModelProto, plan: QuantPlan | None = None,
                         qmoe_max_tokens: int = QMOE_MAX_TOKENS, inplace: bool = False) -> onnx.ModelProto:
    """The model with every ``RoutedExperts`` node lowered; ``plan`` None: a float graph (no ``QMoE``).
    ``qmoe_max_tokens`` 0 leaves ``QMoE`` out. ``inplace``: ``model`` itself is changed and returned (the
    export pipeline's: a copy of the float weights is the size of the model)."""
    out = model if inplace else copied(model)
    names = names_in_use(out.graph)
    params: set[str] = set()  # the float expert parameters the lowered nodes read
    lowered = False
    for graph, visible in scoped_graphs(out.graph):
        for node in [n for n in graph.node if n.domain == DOMAIN and n.op_type == OP]:
            spec = _read(node, visible)
            params.update(node.input[2:])
            layers = _qmoe_layers(spec, plan, visible) if qmoe_max_tokens > 0 else None
            fresh = _namer(names, node.name or "routed_experts")
            if layers is None:
                new, inits = _compaction(spec, node.output[0], fresh)
            else:
                new, inits = _switch(spec, layers, node.output[0], fresh, qmoe_max_tokens)
            replace_node(graph, node, new)
            graph.initializer.extend(inits)
            lowered = True
            log.debug("%s: %s", node.name, "gather/scatter" if layers is None else f"QMoE up to {qmoe_max_tokens} "
                      "tokens, else gather/scatter")
    if not lowered:
        return model
    drop_unused_initializers(out, params)
    _set_opsets(out)
    return out


def _switch(spec: _Experts, layers: list[LayerQuant], y: str, fresh, max_tokens: int
            ) -> tuple[list[onnx.NodeProto], list]:
    """``If(tokens <= max_tokens)``: QMoE, else gather/scatter; the branches read the outer graph's tensors."""
    q_nodes, q_inits = _qmoe(spec, layers, fresh("qmoe_output"), fresh)
    g_nodes, g_inits = _compaction(spec, fresh("gather_scatter_output"), fresh)

    def branch(nodes: list[onnx.NodeProto], name: str) -> onnx.GraphProto:
        out = nodes[-1].output[0]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)])

    tokens = fresh("tokens")
    limit = fresh("qmoe_max_tokens")
    nodes = [helper.make_node("Shape", [spec.x], [tokens], name=tokens, start=0, end=1),
             helper.make_node("LessOrEqual", [tokens, limit], [fresh("few_tokens")], name=fresh("few_tokens_node"))]
    nodes.append(helper.make_node("Squeeze", [nodes[-1].output[0]], [fresh("few_tokens_scalar")],
                                  name=fresh("few_tokens_scalar_node")))
    nodes.append(helper.make_node("If", [nodes[-1].output[0]], [y], name=fresh("qmoe_or_gather_scatter"),
                                  then_branch=branch(q_nodes, fresh("qmoe_branch")),
                                  else_branch=branch(g_nodes, fresh("gather_scatter_branch"))))
    return nodes, [numpy_helper.from_array(np.array([max_tokens], np.int64), limit), *q_inits, *g_inits]


# ------------------------------------------------------------------------------------------------ reading


def _read(node: onnx.NodeProto, visible: ChainMap) -> _Experts:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    act = attrs.get("act", b"silu")
    act = act.decode() if isinstance(act, bytes) else str(act)
    bias = bool(attrs.get("bias", 0))
    per = 6 if bias else 3
    params = list(node.input[2:])
    if len(node.input) < 2 + per or len(params) % per:
        raise ExportError(f"{OP} node {node.name}: {len(params)} parameter inputs is not a multiple of {per} "
                          f"(w1, w3, w2{', b1, b3, b2' if bias else ''} per expert); re-export the model")
    missing = [p for p in params if p not in visible]
    if missing:
        raise ExportError(f"{OP} node {node.name}: expert parameter {missing[0]} is not an initializer; the "
                          "sparse MoE form needs constant expert weights")
    groups = [params[i:i + per] for i in range(0, len(params), per)]
    return _Experts(x=node.input[0], w=node.input[1], weights=tuple(tuple(g[:3]) for g in groups),
                    biases=tuple(tuple(g[3:]) for g in groups) if bias else None, act=act,
                    k=int(attrs.get("k", len(groups))))


def qmoe_block(d_model: int, d_hidden: int) -> int | None:
    """The QMoE block size for these widths: the largest of `QMOE_BLOCKS` dividing both, else None."""
    return next((b for b in QMOE_BLOCKS if d_model % b == 0 and d_hidden % b == 0), None)


def _qmoe_layers(spec: _Experts, plan: QuantPlan | None, visible: ChainMap) -> list[LayerQuant] | None:
    """The plan's 3E layers (per expert w1, w3, w2) when QMoE can run them all, else None (with why, logged)."""
    if plan is None:
        return None
    if spec.act != QMOE_ACT:
        log.info("%s: activation %s is not SwiGLU; per-expert gather/scatter", spec.x, spec.act)
        return None
    layers = []
    for w in (n for group in spec.weights for n in group):
        name = plan.path_of_weight(w)
        q = plan.layers.get(name) if name else None
        if q is None or q.kind is not LayerKind.LINEAR or q.act_bits != 8 or q.weight_int.ndim != 2:
            log.info("%s: expert layer %s is not an int8 Linear of the plan; per-expert gather/scatter", spec.x, w)
            return None
        if tuple(q.weight_int.shape) != tuple(visible[w].dims):
            raise ExportError(f"layer {q.name}: ONNX weight {w} has shape {list(visible[w].dims)}, the plan "
                              f"{list(q.weight_int.shape)}; was the plan made for this model?")
        layers.append(q)
    d_hidden, d_model = layers[0].weight_int.shape
    if qmoe_block(d_model, d_hidden) is None:
        log.info("%s: no block of %s divides d=%d and hidden=%d; per-expert gather/scatter", spec.x, QMOE_BLOCKS,
                 d_model, d_hidden)
        return None
    return layers


# ------------------------------------------------------------------------------------------------ writing


def _qmoe(spec: _Experts, layers: list[LayerQuant], y: str, fresh) -> tuple[list[onnx.NodeProto], list]:
    n_experts = len(spec.weights)
    d_hidden, d_model = layers[0].weight_int.shape
    block = qmoe_block(d_model, d_hidden)

    def codes(q: LayerQuant) -> np.ndarray:
        return (q.weight_int.astype(np.int16) + _WEIGHT_OFFSET).astype(np.uint8)

    def scales(q: LayerQuant, k: int) -> np.ndarray:  # per output channel, repeated over the K/block blocks
        s = np.broadcast_to(np.asarray(q.weight_scale, np.float32).reshape(-1), (q.weight_int.shape[0],))
        return np.repeat(s[:, None], k // block, axis=1)

    fc1 = np.empty((n_experts, 2 * d_hidden, d_model), np.uint8)
    fc1_s = np.empty((n_experts, 2 * d_hidden, d_model // block), np.float32)
    fc2 = np.empty((n_experts, d_model, d_hidden), np.uint8)
    fc2_s = np.empty((n_experts, d_model, d_hidden // block), np.float32)
    bias = spec.biases is not None
    fc1_b = np.zeros((n_experts, 2 * d_hidden), np.float32) if bias else None
    fc2_b = np.zeros((n_experts, d_model), np.float32) if bias else None
    for e in range(n_experts):
        w1, w3, w2 = layers[3 * e:3 * e + 3]
        fc1[e, 0::2], fc1[e, 1::2] = codes(w1), codes(w3)  # swiglu_fusion=1: gate and up rows interleaved
        fc1_s[e, 0::2], fc1_s[e, 1::2] = scales(w1, d_model), scales(w3, d_model)
        fc2[e], fc2_s[e] = codes(w2), scales(w2, d_hidden)
        if bias:
            fc1_b[e, 0::2], fc1_b[e, 1::2] = _bias(w1), _bias(w3)
            fc2_b[e] = _bias(w2)
    path = _common_prefix([q.name for q in layers])
    inits, names = [], {}
    for role, value in (("fc1_quantized", fc1), ("fc1_scale", fc1_s), ("fc1_bias", fc1_b), ("fc2_quantized", fc2),
                        ("fc2_scale", fc2_s), ("fc2_bias", fc2_b)):
        if value is not None:
            names[role] = fresh(f"{path}{role}")
            inits.append(numpy_helper.from_array(value, names[role]))
    nodes = []
    inputs = [spec.x, spec.w, names["fc1_quantized"], names["fc1_scale"], names.get("fc1_bias", ""),
              names["fc2_quantized"], names["fc2_scale"], names.get("fc2_bias", ""), "", "", "", "", "", "", spec.w]
    nodes.append(helper.make_node(
        "QMoE", inputs, [y], name=fresh(f"{path}qmoe"), domain=MS_DOMAIN, k=min(spec.k, n_experts),
        activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=0, expert_weight_bits=8,
        block_size=block, activation_alpha=1.0, activation_beta=0.0))
    return nodes, inits


def _bias(q: LayerQuant) -> np.ndarray:
    if q.bias is None:
        raise ExportError(f"layer {q.name}: the expert has biases but the plan has none for it; recalibrate")
    return np.asarray(q.bias, np.float32).reshape(-1)


def _common_prefix(names: list[str]) -> str:
    """``a.b.experts.`` for ``a.b.experts.0.w1`` ...: where the packed tensors are named."""
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common) + "." if common else ""


def _compaction(spec: _Experts, y: str, fresh) -> tuple[list[onnx.NodeProto], list]:
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def op(op_type: str, inputs: list[str], hint: str, out: str | None = None, **attrs) -> str:
        name = out or fresh(hint)
        nodes.append(helper.make_node(op_type, inputs, [name], name=fresh(f"{hint}_node") if out else name, **attrs))
        return name

    def const(hint: str, value: np.ndarray) -> str:
        name = fresh(hint)
        inits.append(numpy_helper.from_array(value, name))
        return name

    axis1 = const("axis1", np.array([1], np.int64))
    acc = op("ConstantOfShape", [op("Shape", [spec.x], "x_shape")], "zeros",
             value=numpy_helper.from_array(np.zeros(1, np.float32)))
    n_experts = len(spec.weights)
    for e, (w1, w3, w2) in enumerate(spec.weights):
        b1, b3, b2 = spec.biases[e] if spec.biases is not None else (None, None, None)
        p = f"expert{e}"
        col = op("Gather", [spec.w, const(f"{p}_index", np.array(e, np.int64))], f"{p}_weight", axis=1)  # [T]
        rows = op("Transpose", [op("NonZero", [col], f"{p}_nonzero")], f"{p}_rows")  # [n, 1]
        xe = op("GatherND", [spec.x, rows], f"{p}_input")
        we = op("Unsqueeze", [op("GatherND", [col, rows], f"{p}_row_weight"), axis1], f"{p}_row_weight_column")
        gate = op("Gemm", [xe, w1] + ([b1] if b1 else []), f"{p}_w1", transB=1)
        up = op("Gemm", [xe, w3] + ([b3] if b3 else []), f"{p}_w3", transB=1)
        h = op("Mul", [_activation(spec.act, gate, op, p), up], f"{p}_hidden")
        ye = op("Gemm", [h, w2] + ([b2] if b2 else []), f"{p}_w2", transB=1)
        last = e == n_experts - 1
        acc = op("ScatterND", [acc, rows, op("Mul", [ye, we], f"{p}_weighted")], f"{p}_sum", out=y if last else None,
                 reduction="add")
    if not n_experts:
        raise ExportError(f"{OP} node for {spec.x} has no experts; re-export the model")
    return nodes, inits


def _activation(act: str, x: str, op, p: str) -> str:
    if act == "silu":
        return op("Mul", [x, op("Sigmoid", [x], f"{p}_sigmoid")], f"{p}_silu")
    if act in ("gelu", "gelu_tanh"):
        return op("Gelu", [x], f"{p}_gelu", approximate="tanh" if act == "gelu_tanh" else "none")
    if act == "relu":
        return op("Relu", [x], f"{p}_relu")
    raise ExportError(f"{OP}: activation {act!r} is unknown; use silu, gelu, gelu_tanh or relu")


# ------------------------------------------------------------------------------------------------ graphs


def _namer(names: set[str], base: str):
    def fresh(hint: str) -> str:
        return fresh_name(names, hint if "." in hint else f"{base}.{hint}")
    return fresh



def _set_opsets(model: onnx.ModelProto) -> None:
    domains = {n.domain for g in graphs(model.graph) for n in g.node}
    imports = {o.domain for o in model.opset_import}
    if MS_DOMAIN in domains and MS_DOMAIN not in imports:
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if DOMAIN not in domains:
        keep = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(keep)

