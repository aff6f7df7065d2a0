"""The cpu target's latency-aware pass: measured decisions, recorded with their times, and switchable.

The slow case is built to be slow in INT8 by a wide margin: a chain of quantized HardSwish ops, which
ONNX Runtime runs as DequantizeLinear -> HardSigmoid -> Mul -> QuantizeLinear each (it has no integer
HardSwish), against one float HardSwish each.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgegate.errors import TargetError
from edgegate.onnx_export.passes.float_regions import all_float, regions, to_float, with_node_names
from edgegate.targets.cpu import CpuOptions, CpuTarget

SHAPE = [1, 32, 64, 64]
CHAIN = 4


def hardswish_chain() -> onnx.ModelProto:
    """x -> (Q -> DQ -> HardSwish) x CHAIN -> Q -> DQ -> y, uint8 activations, scale 1/32."""
    inits = [numpy_helper.from_array(np.float32(1 / 32), "s"), numpy_helper.from_array(np.uint8(128), "z")]
    nodes, x = [], "x"
    for i in range(CHAIN):
        nodes += [helper.make_node("QuantizeLinear", [x, "s", "z"], [f"q{i}"], name=f"q{i}"),
                  helper.make_node("DequantizeLinear", [f"q{i}", "s", "z"], [f"d{i}"], name=f"d{i}"),
                  helper.make_node("HardSwish", [f"d{i}"], [f"h{i}"], name=f"hardswish{i}")]
        x = f"h{i}"
    nodes += [helper.make_node("QuantizeLinear", [x, "s", "z"], ["qy"], name="qy"),
              helper.make_node("DequantizeLinear", ["qy", "s", "z"], ["y"], name="dy")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    options = CpuOptions(intra_op_threads=1, timing_inputs={"x": x})
    return CpuTarget().compile(hardswish_chain(), options, tmp_path_factory.mktemp("cpu")), x


def test_slower_int8_region_is_made_float_and_recorded(compiled):
    artifact, x = compiled
    record = artifact.options["latency_aware_decisions"]
    (decision,) = record["regions"]
    assert decision["nodes"] == CHAIN and decision["kept"] == "float"
    # The decision follows the times it records: INT8 kept only at >= 1.02x; here float wins clearly.
    assert decision["float_ms"]["1"] < decision["int8_ms"]["1"] and decision["int8_speedup"]["1"] < 1.02
    assert record["min_speedup"] == 1.02 and record["batches"] == [1] and record["threads"] == 1
    model = onnx.load_from_string(artifact.files["model.onnx"])
    ops = [n.op_type for n in model.graph.node]
    # Only the output's Q/DQ may stay (the graph decided region by region), or none (the all-float form won).
    assert ops.count("HardSwish") == CHAIN and ops.count("QuantizeLinear") <= 1
    # Float is at least as exact as the quantized chain, against the chain computed in float64.
    from edgegate.targets.cpu import _session

    exact = x.astype(np.float64)
    for _ in range(CHAIN):
        exact = exact * np.clip(exact / 6 + 0.5, 0, 1)
    int8 = _session(hardswish_chain().SerializeToString(), CpuOptions(), "int8").run(None, {"x": x})[0]
    tuned = _session(artifact.files["model.onnx"], CpuOptions(), "tuned").run(None, {"x": x})[0]
    assert np.abs(tuned - exact).mean() < np.abs(int8 - exact).mean()


def test_decisions_go_to_the_manifest_options_and_load_back(compiled):
    artifact, _ = compiled
    options = CpuOptions.from_manifest(artifact.options)
    assert options.latency_aware is True and options.timing_inputs is None
    assert "timing_inputs" not in artifact.options


def test_latency_aware_false_leaves_the_graph_alone(tmp_path):
    x = np.zeros(SHAPE, np.float32)
    artifact = CpuTarget().compile(hardswish_chain(), CpuOptions.from_strings({"latency_aware": "false"}, x), tmp_path)
    assert "latency_aware_decisions" not in artifact.options and artifact.options["latency_aware"] is False
    model = onnx.load_from_string(artifact.files["model.onnx"])
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == CHAIN + 1


def test_cpu_options_from_strings():
    assert CpuOptions.from_strings({"intra_op_threads": "2", "latency_aware": "off"}).intra_op_threads == 2
    with pytest.raises(TargetError, match="latency_aware='maybe' must be true or false"):
        CpuOptions.from_strings({"latency_aware": "maybe"})
    with pytest.raises(TargetError, match="cpu takes no --target-option 'warp'"):
        CpuOptions.from_strings({"warp": "9"})


def test_regions_and_to_float_keep_neighbours_int8():
    """Two regions by scope: turning the first to float leaves the second's Q/DQ in place."""
    model = hardswish_chain()
    for i, node in enumerate(n for n in model.graph.node if n.op_type == "HardSwish"):
        node.metadata_props.add(key="pkg.torch.onnx.name_scopes",
                                value=str(["", f"stage{i // 2}", f"hardswish_{i}"]))
    model = with_node_names(model)
    found = regions(model)
    assert [(name, len(nodes)) for name, nodes in found] == [("stage0", 2), ("stage1", 2)]
    first = to_float(model, found[0][1])
    readers = {n.name: list(n.input) for n in first.graph.node}
    assert readers["hardswish0"] == ["x"] and readers["hardswish1"] == ["h0"]  # float inside the region
    assert readers["hardswish2"] == ["d2"] and readers["hardswish3"] == ["d3"]  # INT8 input kept outside
    onnx.checker.check_model(first, full_check=True)


def test_all_float_drops_every_activation_qdq():
    model = all_float(with_node_names(hardswish_chain()))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops and ops.count("HardSwish") == CHAIN
    assert [o.name for o in model.graph.output] == ["y"]
    onnx.checker.check_model(model, full_check=True)


def _scoped(node: onnx.NodeProto, path: str) -> onnx.NodeProto:
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=str(["", path, node.name]))
    return node


def conv_chain(blocks: int = 2, channels: int = 64, size: int = 56) -> onnx.ModelProto:
    """x -> Q/DQ -> (Conv 3x3 with int8 per-channel weights -> Relu -> Q/DQ) x blocks, one scope per block:
    the ResNet-body shape where ONNX Runtime's QLinearConv beats its float Conv several times over."""
    rng = np.random.default_rng(0)
    s, z = numpy_helper.from_array(np.float32(1 / 16), "s"), numpy_helper.from_array(np.uint8(0), "z")
    inits, nodes, x = [s, z], [], "x"
    nodes += [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="xq"),
              helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="xd")]
    x = "xd"
    for i in range(blocks):
        w = rng.integers(-127, 128, (channels, channels, 3, 3)).astype(np.int8)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(np.full(channels, 1e-3, np.float32), f"ws{i}"),
                  numpy_helper.from_array(np.zeros(channels, np.int8), f"wz{i}")]
        nodes += [helper.make_node("DequantizeLinear", [f"w{i}", f"ws{i}", f"wz{i}"], [f"wd{i}"], name=f"wd{i}",
                                   axis=0),
                  _scoped(helper.make_node("Conv", [x, f"wd{i}"], [f"c{i}"], name=f"conv{i}", pads=[1] * 4),
                          f"layer{i}.conv"),
                  _scoped(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"), f"layer{i}.relu"),
                  helper.make_node("QuantizeLinear", [f"r{i}", "s", "z"], [f"q{i}"], name=f"q{i}"),
                  helper.make_node("DequantizeLinear", [f"q{i}", "s", "z"], [f"d{i}" if i < blocks - 1 else "y"],
                                   name=f"d{i}")]
        x = f"d{i}"
    shape = [1, channels, size, size]
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_faster_int8_regions_stay_int8_by_their_profiled_times(tmp_path):
    """Each region is timed by ORT's per-node profile (the fused QLinearConv against the float Conv + Relu
    that ORT fuses across the region's layers), not by whole-graph trials one region at a time."""
    x = np.abs(np.random.default_rng(1).standard_normal([1, 64, 56, 56])).astype(np.float32)
    artifact = CpuTarget().compile(conv_chain(), CpuOptions(intra_op_threads=1, timing_inputs={"x": x}), tmp_path)
    record = artifact.options["latency_aware_decisions"]
    # Conv and Relu are regions of their own by scope; ORT's float graph fuses them into one node named
    # after the Relu's output, so each pair is decided together.
    assert [(d["region"], d["nodes"], d["kept"]) for d in record["regions"]] == [
        ("layer0.conv..layer0.relu", 2, "int8"), ("layer1.conv..layer1.relu", 2, "int8")]
    for d in record["regions"]:
        assert d["float_ms"]["1"] > 0 and d["int8_ms"]["1"] > 0
        assert d["int8_speedup"]["1"] == round(d["float_ms"]["1"] / d["int8_ms"]["1"], 4) >= 1.02
    assert record["final"]["kept"] == "decided" and set(record["final"]) == {"decided", "float", "kept"}
    from tests.unit._ort import optimized_op_types

    ops = optimized_op_types(onnx.load_from_string(artifact.files["model.onnx"]))
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 0


def test_regions_cut_at_whole_blocks():
    """Leaf scopes over the limit: the cut moves up to blocks instead of merging leaves across blocks."""
    model = hardswish_chain()
    for node, path in zip((n for n in model.graph.node if n.op_type == "HardSwish"),
                          ("stage0.a", "stage0.b", "stage0.c", "stage1.a"), strict=True):
        _scoped(node, path)
    found = regions(with_node_names(model), max_regions=2)
    assert [(name, len(nodes)) for name, nodes in found] == [("stage0", 3), ("stage1", 1)]


def test_region_times_follow_ort_node_names():
    from edgegate.targets.cpu_latency import _by_region, _fastest, _merge_unseen

    owner = {"conv0": "a", "r0": "a", "conv1": "b"}
    # ORT's names: a fused node keeps its node's name plus _token_N, an NCHWc node its output's plus _nchwc.
    times, rest = _by_region({"conv0_token_3": 1.0, "r0_nchwc": 0.5, "conv1": 2.0, "Transpose": 0.25}, owner)
    assert times == {"a": 1.5, "b": 2.0} and rest == 0.25
    found = [("a", ["n1"]), ("b", ["n2"]), ("c", ["n3"])]
    merged = _merge_unseen(found, {"a": {(1, "int8"): 1.0, (1, "float"): 0.0},
                                   "b": {(1, "int8"): 2.0, (1, "float"): 4.0},
                                   "c": {(1, "int8"): 0.0, (1, "float"): 1.0}})
    # a's float nodes were fused into b's: decided together; c, last, joins the one before.
    assert merged == [("a..c", ["n1", "n2", "n3"], {(1, "int8"): 3.0, (1, "float"): 5.0})]
    assert _fastest({1: {"decided": 2.0, "int8": 1.0, "float": 3.0}, 8: {"decided": 9.0, "int8": 8.0,
                                                                           "float": 8.5}}) == "int8"
    assert _fastest({1: {"decided": 2.0, "float": 1.9}}) == "float"
    # Both beat float: the faster ships, not the profile's choice (a profile that missed a region's float nodes
    # decided it float; the whole graph measured 2.6x faster in INT8).
    assert _fastest({1: {"decided": 4.30, "float": 4.64, "int8": 1.67}, 8: {"decided": 13.4, "float": 13.6,
                                                                           "int8": 4.28}}) == "int8"
    assert _fastest({1: {"decided": 1.0, "float": 2.0, "int8": 1.0}}) == "decided"  # a tie: the decided graph


def test_node_times_are_per_row_then_averaged():
    """Calls cycle over the rows; a node behind an exit runs on no rows (microseconds) for a row that left
    before it: its fastest call per row, averaged over the rows, not its fastest call overall."""
    from edgegate.targets.cpu_latency import _per_call_ms

    def run(call: int, stage2_ms: float | None) -> list[dict]:
        ts = 1000 * call
        out = [{"cat": "Session", "name": "model_run", "ts": ts, "dur": 900},
               {"cat": "Node", "name": "stage1_kernel_time", "ts": ts + 10, "dur": 100 + call}]
        if stage2_ms is not None:
            out.append({"cat": "Node", "name": "stage2_kernel_time", "ts": ts + 200, "dur": stage2_ms * 1e3})
        return out

    # Two rows in turn over three rounds: row 0 exits after stage 1 (stage 2 runs on 0 rows), row 1 runs on.
    events = [e for c in range(6) for e in run(c, 0.001 if c % 2 == 0 else 0.5 + 0.1 * c)]
    got = _per_call_ms(events, 2)
    assert got["stage1"] == pytest.approx((0.100 + 0.101) / 2)  # each row's fastest call
    assert got["stage2"] == pytest.approx((0.001 + 0.6) / 2)
    # A node that runs for one row only (an If branch) counts as nothing for the other.
    assert _per_call_ms([e for c in range(4) for e in run(c, 0.4 if c % 2 else None)], 2)["stage2"] == 0.2


def test_fused_and_lowered_node_names_find_their_region():
    from edgegate.targets.cpu_latency import _region_of

    owner = {"node_linear": "a", "fc.1.": "b", "fc.1.matmul_integer": "b"}
    assert _region_of("fused node_linear", owner) == "a"  # Gemm + Relu
    assert _region_of("fc.1.matmul_float_1/MatMulAddFusion", owner) == "b"  # a lowered layer back in float
    assert _region_of("fc.1.matmul_integer_token_2", owner) == "b"
    assert _region_of("fc.10.matmul_float", owner) is None and _region_of("fc", owner) is None


RANGE = 40.0  # the activation range [0, RANGE] of both layers' inputs (inputs in [0, 3], Relu outputs below it)


def _lowered_mlp(act_bits: int) -> tuple[onnx.ModelProto, list, np.ndarray]:
    """x -> Linear "fc.0" (lowered to integer matmuls, 8- or 16-bit input) -> Relu -> Linear "fc.1" -> y."""
    from edgegate.onnx_export.passes._graph import fresh_name, value_names
    from edgegate.onnx_export.passes.insert_qdq import int32_bias
    from edgegate.onnx_export.passes.integer_kernels import lower_integer
    from edgegate.quantization.plan import LayerKind, LayerQuant

    rng = np.random.default_rng(0)
    shapes, layers, nodes, x = [(16, 32), (8, 16)], [], [], "x"
    inits = []
    for i, (n_out, n_in) in enumerate(shapes):
        w = rng.standard_normal((n_out, n_in)).astype(np.float32)
        w_scale = (np.abs(w).max(axis=1) / 127).astype(np.float32)
        q = LayerQuant(f"fc.{i}", LayerKind.LINEAR, act_scale=RANGE / (2 ** act_bits - 1), act_zero_point=0,
                       act_signed=False, weight_int=np.round(w / w_scale[:, None]).astype(np.int8),
                       weight_scale=w_scale, bias=rng.standard_normal(n_out).astype(np.float32), samples=64,
                       act_bits=act_bits)
        layers.append(q)
        grid = (np.float32(q.act_scale) * q.weight_scale).astype(np.float32)  # Int32Bias values, as insert_qdq
        bias = (int32_bias(q.bias, grid).astype(np.float32) * grid).astype(np.float32)
        inits += [numpy_helper.from_array(q.dequantized_weight(), f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"h{i}"], name=f"gemm{i}", transB=1))
        x = f"h{i}"
        if i == 0:
            nodes.append(helper.make_node("Relu", [x], ["r0"], name="relu0"))
            x = "r0"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    names = set(value_names(model.graph))
    for q, node in zip(layers, [n for n in model.graph.node if n.op_type == "Gemm"], strict=True):
        def fresh(suffix, _q=q):
            return fresh_name(names, f"{_q.name}.{suffix}")

        def init(suffix, value, _fresh=fresh):
            name = _fresh(suffix)
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
            return name
        lower_integer(q, model.graph, node, fresh, init, numpy_helper.to_array(
            next(t for t in reference.graph.initializer if t.name == node.input[2])))
    x = rng.uniform(0, 3, (4, 32)).astype(np.float32)
    return model, reference, x


@pytest.mark.parametrize("act_bits", [8, 16])
def test_integer_lowered_layers_are_regions_and_turn_float(act_bits):
    """A Linear lowered to MatMulInteger reads no DequantizeLinear; the pass still sees it (its own region) and
    turns it back into a float MatMul on its dequantized weights."""
    from edgegate.onnx_export.passes.float_regions import integer_layers
    from edgegate.targets.cpu import _session

    model, reference, x = _lowered_mlp(act_bits)
    model = with_node_names(model)
    assert [layer.path for layer in integer_layers(model.graph)] == ["fc.0", "fc.1"]
    found = dict(regions(model))
    assert set(found) == {"fc.0", "fc.1"}
    first = to_float(model, found["fc.0"])
    ops = [n.op_type for n in first.graph.node]
    assert ops.count("MatMul") == 1 and ops.count("MatMulInteger") == (1 if act_bits == 8 else 2)
    assert [layer.path for layer in integer_layers(first.graph)] == ["fc.1"]  # the other layer stays integer
    onnx.checker.check_model(first, full_check=True)
    floated = all_float(model)
    assert not any(n.op_type == "MatMulInteger" for n in floated.graph.node)
    run = {k: _session(m.SerializeToString(), CpuOptions(), k).run(None, {"x": x})[0]
           for k, m in (("ref", reference), ("int", model), ("first", first), ("float", floated))}
    # Float on the integer weights is the fake-quantized model without its activation rounding: exact to float
    # rounding against the float graph on the same (dequantized) weights.
    np.testing.assert_allclose(run["float"], run["ref"], rtol=1e-5, atol=1e-5)
    # The integer layers round their inputs: within a few percent at 8 bits, far closer at 16.
    tol = (0.05 if act_bits == 8 else 1e-3) * np.abs(run["ref"]).max()
    assert 0 < np.abs(run["int"] - run["ref"]).max() < tol and np.abs(run["first"] - run["ref"]).max() < tol
    # The pass times each layer on both sides: ORT's names for its float MatMul + Add (fused) lead back to it.
    from edgegate.targets.cpu_latency import keep_fast_regions

    _, record = keep_fast_regions(model, {"x": x}, CpuOptions(intra_op_threads=1))
    assert [d["region"] for d in record["regions"]] == ["fc.0", "fc.1"]
    assert all(d["float_ms"][b] > 0 and d["int8_ms"][b] > 0 for d in record["regions"] for b in ("1", "8"))
