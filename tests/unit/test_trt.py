"""Target ``trt``: real TensorRT-RTX engines for every zoo model (fp16 and int8), built without a GPU.

The module fixture exports each zoo model once (float ONNX, dynamic batch), builds the fp16 engine
from it and the int8 engine from its gate-aware QDQ graph (trt flavor: symmetric int8, zero point 0),
at builder optimization level 0 to keep the build fast. Running an engine needs an NVIDIA GPU:
those tests are marked ``gpu`` and skip elsewhere.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("tensorrt_rtx_bindings", exc_type=ImportError)

from edgegate import targets, zoo  # noqa: E402
from edgegate.errors import TargetError  # noqa: E402
from edgegate.onnx_export.passes.cast_fp16 import cast_fp16  # noqa: E402
from edgegate.onnx_export.passes.lower_trt import lower_trt  # noqa: E402
from edgegate.ops import DOMAIN, pack_ternary, reference  # noqa: E402
from edgegate.ops.onnx_function import function_proto  # noqa: E402
from edgegate.targets import CompileContext  # noqa: E402
from edgegate.targets.trt import ENGINE_FILE, MODEL_FILE, TrtOptions, check_engine  # noqa: E402

MODELS = [e.name for e in zoo.list_models()]
TRT = targets.get("trt")


def _export(name, zoo_model):
    """(float ONNX, int8 QDQ ONNX, sample inputs) of a zoo model, as the export pipeline makes them."""
    from edgegate.data import split_data
    from edgegate.gates import find_gates
    from edgegate.onnx_export.torch_export import ExportOptions, export_onnx
    from edgegate.quantization.plan import QdqForm
    from edgegate.quantization.step import QuantOptions, quantize_for_export

    model, _ = zoo_model(name)
    entry = zoo.entry(name)
    spec = entry.inputs[0]
    calib, held_out = split_data(entry.load_data())
    x = calib.input()[:16]
    q = quantize_for_export(model, find_gates(model), QuantOptions(scheme="int8"), QdqForm.SYMMETRIC, calib,
                            held_out, spec)
    # One export serves both: the deployed float model (exit thresholds re-tuned for int8) is a float
    # model like any other, and its QDQ lowering is the int8 graph the pipeline would build.
    float_onnx = export_onnx(q.export_model, torch.from_numpy(x), spec.name, ExportOptions())
    return float_onnx, q.lower(float_onnx), x


@pytest.fixture(scope="module")
def built(zoo_model, tmp_path_factory):
    """name -> {"fp16": Artifact, "int8": Artifact, "x": inputs, "float": float ONNX}."""
    out = {}
    for name in MODELS:
        float_onnx, int8_onnx, x = _export(name, zoo_model)
        entry = {"x": x, "float": float_onnx}
        for quant, proto in (("fp16", float_onnx), ("int8", int8_onnx)):
            options = TRT.options_for_export({"flavor": "rtx", "opt_level": "0"}, CompileContext(quant=quant))
            entry[quant] = TRT.compile(proto, options, tmp_path_factory.mktemp(f"{name}-{quant}"))
        out[name] = entry
    return out


@pytest.mark.parametrize("name", MODELS)
def test_every_zoo_model_builds_fp16_and_int8_engines(built, name):
    for quant in ("fp16", "int8"):
        art = built[name][quant]
        engine = art.files[ENGINE_FILE]
        assert engine[:4] == b"vtrt" and len(engine) > 100_000  # a TensorRT-RTX plan, with kernels
        b = art.options["build"]
        assert b["builder"] == "edgegate" and b["flavor"] == "rtx" and b["trt_version"].startswith("1.")
        assert b["engine_sha256"] == hashlib.sha256(engine).hexdigest() and b["engine_bytes"] == len(engine)
        assert b["compute_capabilities"] == ["80", "86", "89", "120", "121"]
        assert b["profiles"] and b["profiles"][0]["max"][0] == 64  # dynamic batch: one profile
        assert b["flags"]["builder_optimization_level"] == 0 and b["strongly_typed"]
        assert set(b["plugins"].values()) <= {"inlined", "plugin"}
        assert art.options["precision"] == quant and art.options["fp16"] is (quant == "fp16")
        assert b["timing_cache"] is None  # TensorRT-RTX has no build timing cache (kernels compile at run time)
        precisions = b["layer_precisions"]
        if quant == "fp16":
            assert any(k.endswith(":HALF") for k in precisions) and art.options["golden_atol"] > 0
        else:
            assert precisions.get("QUANTIZE:INT8", 0) >= 1, precisions  # explicit int8 activations


@pytest.mark.parametrize("name", MODELS)
def test_model_onnx_is_the_built_graph_and_runs_in_onnxruntime(built, name):
    art, x = built[name]["fp16"], built[name]["x"]
    model = onnx.load_model_from_string(art.files[MODEL_FILE])
    onnx.checker.check_model(model, full_check=True)
    float_model = built[name]["float"]
    assert [i.type for i in model.graph.input] == [i.type for i in float_model.graph.input]
    assert [o.name for o in model.graph.output] == [o.name for o in float_model.graph.output]
    # the graph computes in fp16, the edgegate gating ops in fp32 (gate precision policy)
    inits = {t.data_type for t in model.graph.initializer}
    assert TensorProto.FLOAT16 in inits
    assert all(n.op_type != "TernaryMatMul" and n.op_type != "NonZero" for n in model.graph.node)
    feeds = {model.graph.input[0].name: x}
    half = ort.InferenceSession(art.files[MODEL_FILE], providers=["CPUExecutionProvider"]).run(None, feeds)
    full = ort.InferenceSession(float_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for h, f in zip(half, full, strict=True):
        assert h.dtype == f.dtype and h.shape == f.shape
        if f.dtype.kind == "f" and f.ndim == 2:  # logits: the same top-1 on (nearly) every sample
            assert np.mean(h.argmax(-1) == f.argmax(-1)) >= 0.9


# ------------------------------------------------------------------------------------------- lowering


def _ternary_graph(w: np.ndarray, scale: np.ndarray) -> onnx.ModelProto:
    n, k = w.shape
    node = helper.make_node("TernaryMatMul", ["x", "w", "s"], ["y"], domain=DOMAIN, name="tm", in_features=k)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", n])],
                              [numpy_helper.from_array(pack_ternary(w), "w"), numpy_helper.from_array(scale, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)])
    model.functions.append(function_proto("TernaryMatMul"))
    return model


def test_lower_trt_ternary_weights_reach_matmul_through_int8_dequantize():
    rng = np.random.default_rng(0)
    w = rng.integers(-1, 2, size=(6, 10))
    scale = rng.uniform(0.1, 1.0, size=6).astype(np.float32)
    model = _ternary_graph(w, scale)
    lowered = lower_trt(model)
    onnx.checker.check_model(lowered, full_check=True)
    ops = [n.op_type for n in lowered.graph.node]
    assert ops == ["DequantizeLinear", "MatMul"] and not lowered.functions
    (wq,) = [t for t in lowered.graph.initializer if t.data_type == TensorProto.INT8]
    assert list(wq.dims) == [10, 6]  # [K, N], codes {-1, 0, 1}, only read by DequantizeLinear
    x = rng.standard_normal((3, 10)).astype(np.float32)
    # Without graph optimizations: ONNX Runtime's CPU optimizer would quantize x dynamically for this
    # DequantizeLinear -> MatMul pair; TensorRT runs it weight-only, as written.
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(lowered.SerializeToString(), so).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, reference("TernaryMatMul", x, pack_ternary(w), scale, in_features=10),
                               rtol=1e-5, atol=1e-5)
    assert TRT.check(lowered, "rtx") == []


@pytest.mark.parametrize("mask", [[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
def test_lower_trt_nonzero_matches_onnx_nonzero(mask):
    nodes = [helper.make_node("NonZero", ["m"], ["idx"], name="nz")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("m", TensorProto.BOOL, ["B"])],
                              [helper.make_tensor_value_info("idx", TensorProto.INT64, [1, None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    lowered = lower_trt(model)
    assert "NonZero" not in [n.op_type for n in lowered.graph.node]
    m = np.array(mask, bool)
    (want,) = ort.InferenceSession(model.SerializeToString()).run(None, {"m": m})
    (got,) = ort.InferenceSession(lowered.SerializeToString()).run(None, {"m": m})
    np.testing.assert_array_equal(got, want)
    assert lower_trt(model, nonzero=False).graph.node[0].op_type == "NonZero"


def test_cast_fp16_keeps_io_float32_and_gates_in_float32():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("SigmoidGate", ["h", "h"], ["y"], domain=DOMAIN, name="gate")]
    w = np.random.default_rng(1).standard_normal((4, 4)).astype(np.float32)
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)])
    model.functions.append(function_proto("SigmoidGate"))
    half = cast_fp16(model)
    onnx.checker.check_model(half, full_check=True)
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert half.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert half.graph.initializer[0].data_type == TensorProto.FLOAT16
    producers = {o: n for n in half.graph.node for o in n.output}
    gate = next(n for n in half.graph.node if n.op_type == "SigmoidGate")
    assert all(producers[i].op_type == "Cast" and producers[i].attribute[0].i == TensorProto.FLOAT for i in gate.input)
    xv = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    (got,) = ort.InferenceSession(half.SerializeToString()).run(None, {"x": xv})
    (want,) = ort.InferenceSession(model.SerializeToString()).run(None, {"x": xv})
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------------------- check()


def _model(nodes, inputs, outputs, inits, functions=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "bad", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)])
    model.functions.extend(functions)
    onnx.checker.check_model(model, full_check=True)
    return model


def _quantization_rule_breaker() -> onnx.ModelProto:
    """An int32 bias behind DequantizeLinear and an int8 constant feeding Cast: both refused by TensorRT."""
    return _model(
        [helper.make_node("DequantizeLinear", ["bias_q", "bias_s"], ["bias"], name="bias_dq"),
         helper.make_node("Add", ["x", "bias"], ["y"], name="add"),
         helper.make_node("Cast", ["w8"], ["wf"], name="cast_w8", to=TensorProto.FLOAT),
         helper.make_node("Add", ["y", "wf"], ["z"], name="add2")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.arange(4, dtype=np.int32), "bias_q"),
         numpy_helper.from_array(np.float32(0.5), "bias_s"),
         numpy_helper.from_array(np.ones((1, 4), np.int8), "w8")])


def _unparsable_function() -> onnx.ModelProto:
    """An edgegate op whose function body uses BitShift, which TensorRT's parser does not take."""
    fn = helper.make_function(DOMAIN, "Shifty", ["a", "b"], ["c"],
                              [helper.make_node("BitShift", ["a", "b"], ["c"], direction="RIGHT")],
                              [helper.make_opsetid("", 20)])
    return _model([helper.make_node("Shifty", ["u", "two"], ["v"], domain=DOMAIN, name="shift_node")],
                  [helper.make_tensor_value_info("u", TensorProto.UINT8, [4])],
                  [helper.make_tensor_value_info("v", TensorProto.UINT8, [4])],
                  [numpy_helper.from_array(np.array(2, np.uint8), "two")], [fn])


def test_check_names_trt_invalid_nodes_before_any_build(tmp_path):
    issues = TRT.check(_quantization_rule_breaker(), "rtx")
    by_node = {i.node: i for i in issues}
    assert "int32" in by_node["bias_dq"].message and "float" in by_node["bias_dq"].hint
    assert by_node["cast_w8"].op_type == "Cast" and "DequantizeLinear" in by_node["cast_w8"].message
    (shift,) = TRT.check(_unparsable_function(), "rtx")  # the parser's error, mapped to the outer node
    assert (shift.node, shift.op_type) == ("shift_node", "Shifty") and "BitShift" in shift.message and shift.hint
    with pytest.raises(TargetError, match=r"target trt cannot take node bias_dq \(DequantizeLinear\): .*int32"):
        TRT.compile(_quantization_rule_breaker(), TrtOptions(flavor="rtx", opt_level=0), tmp_path)
    with pytest.raises(TargetError, match=r"cannot parse node shift_node \(Shifty\): .*BitShift"):
        TRT.compile(_unparsable_function(), TrtOptions(flavor="rtx", opt_level=0), tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing was built


def test_cpu_flavor_qdq_is_refused_with_the_fix(tmp_path):
    """A uint8 asymmetric Q/DQ pair (the cpu flavor) is named, with the fix (quantize for trt)."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["y"], name="dq")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(np.float32(0.1), "s"),
                               numpy_helper.from_array(np.array(128, np.uint8), "zp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    issues = TRT.check(model, "rtx")
    assert {i.node for i in issues} >= {"q", "dq"} and all("--target trt" in i.hint for i in issues[:2])


# ------------------------------------------------------------------------------------------- options, manifest


def test_options_for_export():
    o = TRT.options_for_export({"flavor": "rtx", "compute_capabilities": "8.6, 89"}, CompileContext(quant="fp16"))
    assert o.fp16 and o.precision == "fp16" and o.compute_capabilities == ("86", "89")
    o = TRT.options_for_export({"fp16": "true"}, CompileContext(quant="int8", batch=1))
    assert o.fp16 and (o.min_batch, o.opt_batch, o.max_batch) == (1, 1, 1)
    with pytest.raises(TargetError, match="unknown trt option 'bogus'"):
        TRT.options_for_export({"bogus": "1"}, CompileContext())
    with pytest.raises(TargetError, match="contradicts"):
        TRT.options_for_export({"fp16": "false"}, CompileContext(quant="fp16"))
    with pytest.raises(TargetError, match="max_batch"):
        TRT.options_for_export({"opt_batch": "8", "max_batch": "4"}, CompileContext())
    assert TrtOptions.from_manifest(dataclasses.asdict(o) | {"build": {}, "exact": False}) == o


def test_manifest_is_checked_before_the_engine_is_deserialized(built):
    art = built["threshold_gate"]["int8"]
    engine, options = art.files[ENGINE_FILE], art.options
    with pytest.raises(TargetError, match="not built by edgegate.*--trust-model"):
        check_engine(engine, {k: v for k, v in options.items() if k != "build"}, "x/engine.plan")
    with pytest.raises(TargetError, match="is not the engine edgegate built"):
        check_engine(engine + b"\0", options, "x/engine.plan")
    old = {**options, "build": {**options["build"], "trt_version": "1.0.0.1"}}
    with pytest.raises(TargetError, match=r"built with tensorrt_rtx_bindings 1\.0\.0\.1, this machine has 1\."):
        check_engine(engine, old, "x/engine.plan")
    ok, why = TRT.can_run()
    if not ok:  # no GPU here: the error says so, naming the CPU alternative
        assert "NVIDIA" in why
        with pytest.raises(TargetError, match="needs an NVIDIA GPU.*--target cpu"):
            check_engine(engine, options, "x/engine.plan")
        with pytest.raises(TargetError, match="needs an NVIDIA GPU"):
            TRT.load(art)


# ------------------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["fp16", "int8"])
def test_engine_runs_and_follows_onnxruntime(built, quant):
    ok, why = TRT.can_run()
    if not ok:
        pytest.skip(why)
    for name, entry in built.items():
        art, x = entry[quant], entry["x"]
        feeds = {onnx.load_model_from_string(art.files[MODEL_FILE]).graph.input[0].name: x}
        want = ort.InferenceSession(art.files[MODEL_FILE], providers=["CPUExecutionProvider"]).run(None, feeds)
        with TRT.load(art) as runner:
            got = runner.run(feeds)
            assert len(runner.latencies_ms) == 1 and runner.latencies_ms[0] > 0
        for w, name_out in zip(want, runner.output_names, strict=False):
            g = got[name_out]
            assert g.shape == w.shape, name
            if w.dtype.kind == "f" and w.ndim == 2:
                assert np.mean(g.argmax(-1) == w.argmax(-1)) >= 0.9, name
