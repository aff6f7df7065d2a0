"""The deployed INT8 graph on ONNX Runtime CPU: every quantized Linear and Conv runs on an integer kernel.

Each zoo model goes through the pipeline's quantize step (gate-aware calibration, the cpu lowering)
and ONNX Runtime's graph optimizer; the test then counts op types in the session-optimized model.
Float Gemm/Conv/MatMul with a weight operand may remain only for the gate layers the gate precision
policy keeps float. (Activation x activation MatMuls of attention are not weighted layers and are
not quantized: they are not counted.)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgegate import zoo
from edgegate.data import TensorSpec, split_data
from edgegate.gates import find_gates
from edgegate.onnx_export.torch_export import ExportOptions, export_onnx, output_names
from edgegate.quantization.plan import QdqForm
from edgegate.quantization.step import QuantOptions, quantize_for_export

sys.path.insert(0, str(Path(__file__).parent))
from _ort import session  # noqa: E402

FLOAT_COMPUTE = {"Conv", "FusedConv", "NhwcFusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}
MODELS = ["channel_gate", "early_exit", "gated_attention", "moe", "moe_pp", "threshold_gate"]


@pytest.fixture(scope="module")
def lowered(zoo_model):
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            model, _ = zoo_model(name)
            entry = zoo.entry(name)
            spec = TensorSpec(entry.inputs[0].name, tuple(entry.inputs[0].shape), entry.inputs[0].dtype)
            calib, held_out = split_data(entry.load_data())
            q = quantize_for_export(model, find_gates(model), QuantOptions(scheme="int8"), QdqForm.ASYMMETRIC, calib,
                                    held_out, spec)
            x = held_out.input()[:64]
            proto = q.lower(export_onnx(q.export_model, torch.from_numpy(x), spec.name, ExportOptions()))
            cache[name] = (q, proto, x, spec.name, output_names(model))
        return cache[name]

    return get


def _optimized(proto: onnx.ModelProto) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp:
        session(proto, str(Path(tmp) / "optimized.onnx"))
        return onnx.load(str(Path(tmp) / "optimized.onnx"))


@pytest.mark.parametrize("name", MODELS)
def test_no_quantized_layer_is_left_in_float(name, lowered):
    q, proto, *_ = lowered(name)
    g = _optimized(proto).graph
    inits = {t.name for t in g.initializer}
    produced_by = {o: n.op_type for n in g.node for o in n.output}
    float_weighted = [n for n in g.node if n.op_type in FLOAT_COMPUTE and len(n.input) > 1
                      and (n.input[1] in inits or produced_by.get(n.input[1]) == "DequantizeLinear")]
    fed_by_dq = [n for n in float_weighted if produced_by.get(n.input[1]) == "DequantizeLinear"]
    assert not fed_by_dq, [n.name for n in fed_by_dq]  # a quantized layer the runtime would compute in float
    gates = q.record["plan"]["float_layers"]
    assert len(float_weighted) == len(gates), ([n.input[1] for n in float_weighted], gates)
    integer = sum(n.op_type in ("QGemm", "QLinearConv", "MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul")
                  for n in g.node)
    assert integer >= len(q.record["plan"]["layers"])  # A16W8 layers take two integer matmuls
    # Convs (channel_gate's three, the ChannelGate Mul after two of them) run as QLinearConv: each has an
    # output quantizer, the QuantizeLinear ORT x86 needs behind a Conv to fuse it.
    convs = [p for p, v in q.record["plan"]["layers"].items() if v["kind"] == "conv"]
    assert sum(n.op_type == "QLinearConv" for n in g.node) == len(convs) == (3 if name == "channel_gate" else 0)
    assert all(q.record["plan"]["layers"][p]["out_scale"] > 0 for p in convs)


@pytest.mark.parametrize("name", MODELS)
def test_integer_graph_follows_the_fake_quant_model(name, lowered):
    q, proto, x, input_name, names = lowered(name)
    got = session(proto).run(names, {input_name: x})
    with torch.no_grad():
        want = q.reference(torch.from_numpy(x))
    want = want if isinstance(want, tuple) else (want,)
    for n, a, b in zip(names, got, want, strict=True):
        b = b.numpy()
        if n == "logits":
            assert (a.argmax(-1) == b.argmax(-1)).mean() >= 63 / 64, n
            assert np.abs(a - b).max() <= 0.02 * (b.max() - b.min()), (n, np.abs(a - b).max())
        else:
            assert (a == b).mean() >= 63 / 64, n


def test_decision_critical_layers_are_promoted_to_float_first(lowered):
    """The fidelity search promotes layers in front of the exits to float first (on the cpu target a float
    Linear runs faster than its A16W8 form, and is exact): they run as float matmuls, every other layer
    stays 8-bit on integer kernels."""
    q, proto, *_ = lowered("early_exit")
    search = q.record["search"]
    floated = search["chosen"]["float_layers"]
    assert search["met"] and floated and set(floated) <= {"stages.0.0", "stages.1.0"}
    assert "a16w8" not in {t["means"] for t in search["tries"]} and q.record["a16"] is None
    assert search["chosen"]["a16_layers"] == []
    layers = q.record["plan"]["layers"]
    assert all(v["act_bits"] == 8 for v in layers.values()) and not set(floated) & set(layers)
    assert all(p in q.record["plan"]["float_layers"] and "gate fidelity" in q.record["float_layers"][p]
               for p in floated)
    for p in floated:  # its float weight feeds a float Gemm: no Q/DQ, no integer matmul
        assert [n.op_type for n in proto.graph.node if f"{p}.weight" in n.input] == ["Gemm"], p
        assert not [n for n in proto.graph.node if n.name.startswith(f"{p}.")], p


def test_an_a16w8_layer_runs_on_two_byte_sliced_integer_matmuls(zoo_model):
    """A16W8 (asked for here; the search reaches it only after float): the 16-bit input code is split into two
    bytes, each multiplied with the int8 weight by MatMulInteger, no uint16 Q/DQ; the graph follows brevitas'
    16-bit fake-quant layer."""
    from edgegate.calibration import calibrate
    from edgegate.onnx_export.passes.insert_qdq import insert_qdq
    from edgegate.quantization import QuantConfig

    model, _ = zoo_model("early_exit")
    entry = zoo.entry("early_exit")
    calib, held_out = split_data(entry.load_data())
    qmodel, record = calibrate(model, calib.input(), QuantConfig(a16_layers=("stages.1.0",), fidelity_target=0))
    assert record.plan.layers["stages.1.0"].act_bits == 16
    assert all(v.act_bits == 8 for k, v in record.plan.layers.items() if k != "stages.1.0")
    x = held_out.input()[:64]
    proto = insert_qdq(export_onnx(model, torch.from_numpy(x), entry.inputs[0].name, ExportOptions()), record.plan)
    graph = _optimized(proto).graph
    ops = [n.op_type for n in graph.node if n.name.startswith("stages.1.0.")]
    assert ops.count("MatMulInteger") == 2 and "QuantizeLinear" not in ops  # byte-sliced, no uint16 Q/DQ
    names = output_names(model)
    got = session(proto).run(names, {entry.inputs[0].name: x})
    with torch.no_grad():
        want = qmodel.eval()(torch.from_numpy(x))
    for n, a, b in zip(names, got, want, strict=True):
        assert (a.argmax(-1) == b.numpy().argmax(-1)).mean() >= 63 / 64 if n == "logits" else \
            (a == b.numpy()).mean() >= 63 / 64, n


def test_trt_flavor_keeps_the_decision_critical_layer_float(zoo_model):
    """TensorRT has no 16-bit integer activations: the search skips A16W8 there and keeps layers float instead;
    an A16W8 layer asked for explicitly stays float too, said so."""
    from edgegate.calibration import calibrate
    from edgegate.quantization import QuantConfig

    model, _ = zoo_model("early_exit")
    x = zoo.entry("early_exit").load_data().split("val").input()
    _, record = calibrate(model, x, QuantConfig(qdq_form="symmetric"))
    assert record.search.met and record.a16 is None
    assert "a16w8" not in {t.means for t in record.search.tries} and record.search.tries[-1].means == "float"
    chosen = record.search.tries[record.search.chosen].settings
    assert all(p in record.plan.float_layers for p in chosen["float_layers"])
    assert all(q.act_bits == 8 and q.act_zero_point == 0 for q in record.plan.layers.values())
    _, record = calibrate(model, x, QuantConfig(qdq_form="symmetric", a16_layers=("stages.0.0",), fidelity_target=0))
    assert "stages.0.0" in record.plan.float_layers and "TensorRT" in record.float_layers["stages.0.0"]
