"""lower_ternary: TernaryMatMul -> integer matmuls ORT runs, 2-bit weights kept on disk, exact vs the reference.

Errors are in quantization steps: for a lowered layer, the accumulator's LSB (activation step times
the row's weight scale); for a whole model, the step of an 8-bit minmax quantizer of its logits.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _ort import optimized_op_types
from _ort import session as _session
from onnx import TensorProto, helper, numpy_helper

from edgegate import ops, zoo
from edgegate.errors import ExportError
from edgegate.onnx_export.passes import iter_nodes
from edgegate.onnx_export.passes.lower_ternary import lower_ternary
from edgegate.onnx_export.torch_export import export_onnx
from edgegate.ops.onnx_function import ONNX_OPSET, function_proto

FLOAT_MATMULS = {"MatMul", "FusedMatMul", "Gemm", "FusedGemm", "MatMulNBits"}
SCOPES = "pkg.torch.onnx.name_scopes"






def weight_storage(original: onnx.ModelProto, lowered: onnx.ModelProto) -> tuple[float, int]:
    """(bits per ternary weight on disk: packed + scale tensors as serialized, fixed decode bytes).

    The decode bytes are every other initializer the lowered weight paths read (code table, shifts):
    one copy per graph whatever the model size, reported apart so the per-weight figure means the format.
    """
    ternary = [n for n in iter_nodes(original.graph) if n.op_type == "TernaryMatMul"]
    inits = {t.name: t for t in lowered.graph.initializer}
    n_weights = sum(inits[n.input[1]].dims[0] * next(a.i for a in n.attribute if a.name == "in_features")
                    for n in ternary)
    storage = {n.input[1] for n in ternary} | {n.input[2] for n in ternary}
    producer = {o: n for n in iter_nodes(lowered.graph) for o in n.output}
    stack = [n.input[1] for n in iter_nodes(lowered.graph) if n.op_type in ("MatMulInteger", "MatMul")]
    read = set()
    while stack:
        name = stack.pop()
        if name in inits:
            read.add(name)
        elif name in producer:
            stack += list(producer[name].input)
    assert {n.input[1] for n in ternary} <= read  # the packed tensors are what the matmuls read
    per_weight = 8 * sum(inits[n].ByteSize() for n in storage) / n_weights
    return per_weight, sum(inits[n].ByteSize() for n in read - storage)


def _check(proto: onnx.ModelProto) -> None:
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)


def _assert_packed_only(lowered: onnx.ModelProto) -> None:
    """The only weight storage is uint8 packed: no int8/float tensor of a ternary weight's size."""
    packed = [t for t in lowered.graph.initializer if t.data_type == TensorProto.UINT8 and len(t.dims) == 2]
    assert packed
    sizes = {4 * t.dims[0] * t.dims[1] for t in packed} | {4 * t.dims[0] * t.dims[1] - 3 * t.dims[0] for t in packed}
    big = [t.name for t in lowered.graph.initializer if t.data_type != TensorProto.UINT8
           and int(np.prod(t.dims)) >= min(sizes)]
    assert not [n for n in big if "_packed" in n or "weight" in n], big


# ---------------------------------------------------------------------------------------------- zoo models


@pytest.mark.parametrize("name", ["ternary_lm", "hgf_lm"])
def test_zoo_ternary_models_lower_to_integer_matmuls(name, zoo_model):
    model, _ = zoo_model(name)
    x = zoo.example_inputs(name, 1024)[0].numpy()
    proto = export_onnx(model, zoo.example_inputs(name, 4)[0], "tokens")
    lowered = lower_ternary(proto)
    _check(lowered)

    assert not any(n.op_type == "TernaryMatMul" for n in iter_nodes(lowered.graph))
    assert "TernaryMatMul" not in {f.name for f in lowered.functions}
    _assert_packed_only(lowered)
    bits, decode_bytes = weight_storage(proto, lowered)
    assert 2.0 < bits <= 2.2 and decode_bytes <= 96, (bits, decode_bytes)

    # Same int8 x ternary products as the float op, summed exactly: only float rounding differs, far
    # below one output step; a per-token Round tie in the next layer could flip one code, hence 1 step.
    want = _session(proto).run(None, {"tokens": x})[0]
    got = _session(lowered).run(None, {"tokens": x})[0]
    err = np.abs(got - want).max(axis=1) / ((want.max() - want.min()) / 255)
    assert err.max() <= 1 and np.mean(err <= 1e-2) >= 0.99, err.max()
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.999

    before, after = optimized_op_types(proto), optimized_op_types(lowered)
    assert after["MatMulInteger"] == 2
    n_float = sum(before[t] for t in FLOAT_MATMULS)
    assert sum(after[t] for t in FLOAT_MATMULS) == n_float - 2, (before, after)  # head / low-rank stay float


# ---------------------------------------------------------------------------------------------- one layer

K, N = 250, 64  # K not a multiple of 4: exercises the padded last byte


def _value(name: str, shape: list | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _layer(per_token: bool, rng: np.random.Generator) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    codes = rng.choice([-1, 0, 1], size=(N, K), p=[0.3, 0.4, 0.3]).astype(np.int8)
    packed, scale = ops.pack_ternary(codes), rng.uniform(0.01, 0.05, N).astype(np.float32)
    inits = [numpy_helper.from_array(packed, "fc.packed_weight"), numpy_helper.from_array(scale, "fc.weight_scale")]
    nodes, x = [], "x"
    if per_token:  # the exporter's form of TernaryLinear's per-token absmax quantizer
        inits += [numpy_helper.from_array(np.array(v, np.float32), n)
                  for n, v in (("eps", 1e-5), ("qmax", 127), ("qmin", -128))]
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), "axis"))
        nodes += [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("ReduceMax", ["a", "axis"], ["mx"]),
                  helper.make_node("Clip", ["mx", "eps"], ["mxc"]), helper.make_node("Reciprocal", ["mxc"], ["r"]),
                  helper.make_node("Mul", ["r", "qmax"], ["m"]), helper.make_node("Mul", ["x", "m"], ["xm"]),
                  helper.make_node("Round", ["xm"], ["xr"]), helper.make_node("Clip", ["xr", "qmin", "qmax"], ["c"]),
                  helper.make_node("Div", ["c", "m"], ["xq"])]
        x = "xq"
    node = helper.make_node("TernaryMatMul", [x, "fc.packed_weight", "fc.weight_scale"], ["y"], domain=ops.DOMAIN,
                            in_features=K)
    node.metadata_props.add(key=SCOPES, value="['', 'fc', 'ternary_matmul']")
    graph = helper.make_graph(nodes + [node], "layer", [_value("x", ["B", K])], [_value("y", ["B", N])], inits)
    proto = helper.make_model(graph, functions=[function_proto("TernaryMatMul")], ir_version=10,
                              opset_imports=[helper.make_opsetid("", ONNX_OPSET),
                                             helper.make_opsetid(ops.DOMAIN, ops.DOMAIN_VERSION)])
    return proto, packed, scale


def _dynamic_quantize(x: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """ONNX DynamicQuantizeLinear, dequantized: uint8, range widened to include 0."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = np.float32((hi - lo) / 255)
    zp = np.clip(np.round(-lo / s), 0, 255)
    return ((np.clip(np.round(x / s) + zp, 0, 255) - zp) * s).astype(np.float32), s


STATIC_SCALE = np.float32(4 / 127)


@pytest.mark.parametrize("mode,fused", [("per_token", "MatMulInteger"), ("dynamic", "DynamicQuantizeMatMul"),
                                        ("static", "MatMulIntegerToFloat")])
def test_layer_modes_match_reference_in_accumulator_steps(mode, fused):
    rng = np.random.default_rng(0)
    proto, packed, scale = _layer(mode == "per_token", rng)
    lowered = lower_ternary(proto, {"fc": float(STATIC_SCALE)} if mode == "static" else None)
    _check(lowered)
    _assert_packed_only(lowered)
    bits, decode_bytes = weight_storage(proto, lowered)
    assert bits <= 2.2 and decode_bytes <= 160, (bits, decode_bytes)  # K % 4 != 0 adds the Slice constants

    x = rng.standard_normal((8, K)).astype(np.float32)
    got = _session(lowered).run(None, {"x": x})[0]
    if mode == "per_token":
        m = 127 / np.maximum(np.abs(x).max(-1, keepdims=True), 1e-5)
        xq, step = (np.clip(np.round(x * m), -128, 127) / m).astype(np.float32), scale / m
    elif mode == "dynamic":
        xq, s = _dynamic_quantize(x)
        step = s * scale
    else:
        xq = (np.clip(np.round(x / STATIC_SCALE), -128, 127) * STATIC_SCALE).astype(np.float32)
        step = STATIC_SCALE * scale
    want = ops.reference("TernaryMatMul", xq, packed, scale, in_features=K)
    assert np.abs(got - want).max() > 0 or mode == "per_token"
    assert (np.abs(got - want) / step).max() <= 0.05
    # the float op on unquantized x differs by the activation quantization, many accumulator steps
    assert (np.abs(ops.reference("TernaryMatMul", x, packed, scale, in_features=K) - want) / step).max() > 1

    types = optimized_op_types(lowered)
    assert types[fused] == 1 and not FLOAT_MATMULS & set(types), types
    assert "xq" not in {o for n in lowered.graph.node for o in n.output}  # the quantizer's c / m is gone too


def test_lowering_inside_if_branches():
    rng = np.random.default_rng(1)
    layer, packed, scale = _layer(False, rng)
    branch = helper.make_graph(list(layer.graph.node), "then", [], [_value("y", ["B", N])])
    zeros = numpy_helper.from_array(np.zeros((1, N), np.float32))
    other = helper.make_graph([helper.make_node("Constant", [], ["z"], value=zeros)], "else", [], [_value("z", [1, N])])
    flag = helper.make_tensor_value_info("flag", TensorProto.BOOL, [])
    graph = helper.make_graph([helper.make_node("If", ["flag"], ["out"], then_branch=branch, else_branch=other)], "g",
                              [_value("x", ["B", K]), flag], [_value("out", ["B", N])], list(layer.graph.initializer))
    proto = helper.make_model(graph, functions=list(layer.functions), ir_version=10,
                              opset_imports=list(layer.opset_import))
    lowered = lower_ternary(proto)
    onnx.checker.check_model(lowered, full_check=True)
    then = next(a.g for a in lowered.graph.node[0].attribute if a.name == "then_branch")
    assert "MatMulInteger" in {n.op_type for n in then.node} and not lowered.functions
    x = rng.standard_normal((3, K)).astype(np.float32)
    got = _session(lowered).run(None, {"x": x, "flag": np.array(True)})[0]
    xq, s = _dynamic_quantize(x)
    want = ops.reference("TernaryMatMul", xq, packed, scale, in_features=K)
    assert (np.abs(got - want) / (s * scale)).max() <= 0.05


def test_errors_name_the_layer():
    proto, _, _ = _layer(False, np.random.default_rng(2))
    with pytest.raises(ExportError, match=r"names \['fc2'\], which are no TernaryMatMul layers .*\['fc'\]"):
        lower_ternary(proto, {"fc2": 0.1})
    computed = onnx.ModelProto()
    computed.CopyFrom(proto)
    computed.graph.node.insert(0, helper.make_node("Identity", ["fc.packed_weight"], ["packed_copy"]))
    computed.graph.node[1].input[1] = "packed_copy"
    with pytest.raises(ExportError, match="ternary layer fc: packed weight and scale must be initializers"):
        lower_ternary(computed)
