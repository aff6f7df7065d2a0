"""The snn target on zoo models: accuracy against the quantized source network, early decision, and
clear issues for the families it cannot take. Each model is exported as ``edgegate export --target
snn`` does (quantize with the target's qdq_form, export, lower) and compiled on the calibration split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgegate import zoo
from edgegate.data import TensorSpec
from edgegate.targets import CompileContext
from edgegate.targets.snn import SnnTarget

TARGET = SnnTarget()


def _export(model, name: str, quant: str):
    """(lowered ONNX, calibration inputs, test inputs, test labels) the way the pipeline builds them."""
    from edgegate.data import split_data
    from edgegate.gates import find_gates
    from edgegate.onnx_export.torch_export import ExportOptions, export_onnx
    from edgegate.quantization.plan import QdqForm
    from edgegate.quantization.step import QuantOptions, quantize_for_export

    entry = zoo.entry(name)
    spec = entry.inputs[0]
    calib, held_out = split_data(entry.load_data())
    q = quantize_for_export(model, find_gates(model), QuantOptions(scheme=quant), QdqForm(TARGET.qdq_form), calib,
                            held_out, TensorSpec(spec.name, spec.shape, spec.dtype))
    x = held_out.input()[:8]
    proto = q.lower(export_onnx(q.export_model, torch.from_numpy(x), spec.name, ExportOptions()))
    return proto, calib.input(), held_out.input(), held_out.labels


@pytest.fixture(scope="module")
def exported(zoo_model):
    cache = {}

    def get(name: str, quant: str):
        if (name, quant) not in cache:
            cache[name, quant] = _export(zoo_model(name)[0], name, quant)
        return cache[name, quant]

    return get


def _source_accuracy(proto, x, y) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return float(np.mean(session.run(None, {"x": x})[0].argmax(1) == y))


def _snn(proto, calib, x, y, tmp_path, **options) -> tuple[float, dict]:
    ctx = CompileContext(input_name="x", output_names=("logits",), calibration=calib)
    art = TARGET.compile(proto, TARGET.options_for_export({k: str(v) for k, v in options.items()}, ctx), tmp_path)
    with TARGET.load(art) as runner:
        out = runner.run({"x": x})
        return float(np.mean(out["logits"].argmax(1) == y)), runner.metrics()


@pytest.mark.parametrize("name, quant", [("threshold_gate", "fp32"), ("threshold_gate", "int8"),
                                         ("threshold_gate", "ternary"), ("early_exit", "fp32")])
def test_snn_accuracy_follows_the_quantized_source(exported, tmp_path, name, quant):
    proto, calib, x, y = exported(name, quant)
    source = _source_accuracy(proto, x, y)
    acc128, m128 = _snn(proto, calib, x, y, tmp_path, timesteps=128, early_decision="off")
    acc32, m32 = _snn(proto, calib, x, y, tmp_path, timesteps=32, early_decision="off")
    print(f"{name}/{quant}: source {source:.4f}, snn T=128 {acc128:.4f}, T=32 {acc32:.4f}")
    assert source > 0.85
    assert acc128 >= source - 0.01
    assert acc32 >= source - 0.03
    assert m128["timesteps_to_decision"]["mean"] == 128 and m128["synops"] > 3 * m32["synops"]


@pytest.mark.parametrize("name", ["threshold_gate", "early_exit"])
def test_early_decision_cuts_timesteps_at_no_real_accuracy_cost(exported, tmp_path, name):
    proto, calib, x, y = exported(name, "fp32")
    full, m_full = _snn(proto, calib, x, y, tmp_path, timesteps=128, early_decision="off")
    early, m_early = _snn(proto, calib, x, y, tmp_path, timesteps=128, early_decision="on")
    mean_steps = m_early["timesteps_to_decision"]["mean"]
    print(f"{name}: full {full:.4f} at 128 steps, early {early:.4f} at {mean_steps:.1f} mean steps")
    assert 128 / mean_steps >= 1.5
    assert early >= full - 0.005
    assert m_early["energy_pj"]["total"] < m_full["energy_pj"]["total"] / 1.5


def test_early_exit_models_decide_early_by_default(exported, tmp_path):
    proto, calib, x, _ = exported("early_exit", "fp32")
    art = TARGET.compile(proto, TARGET.options_for_export({}, CompileContext(calibration=calib,
                                                                            output_names=("logits", "exit_index"))),
                         tmp_path)
    assert art.options["early_decision"] == "on"
    with TARGET.load(art) as runner:
        out = runner.run({"x": x[:16]})
    assert set(out) == {"logits", "exit_index"} and (out["exit_index"] == 2).all()
    assert runner.metrics()["timesteps_to_decision"]["max"] <= 128


@pytest.mark.parametrize("name, op_type", [("moe", "Add"), ("gated_attention", "ReduceMean"),
                                           ("channel_gate", "ChannelGate")])
def test_unsupported_zoo_families_are_named(name, op_type):
    from edgegate.onnx_export.torch_export import ExportOptions, export_onnx

    model = zoo.build(name).eval()
    (x,) = zoo.example_inputs(name, batch=2)
    proto = export_onnx(model, x, model.input_names[0], ExportOptions())
    issues = TARGET.check(proto)
    assert issues[0].op_type == op_type and "no SNN form" in issues[0].message
    assert issues[0].node in {n.name for n in proto.graph.node}


def test_neurocorex_sized_digits_network(tmp_path):
    """NeuroCoreX's digits example is a 64 -> 10 network (66 % in its simulation); ours, converted."""
    from edgegate.data import split_data
    from edgegate.onnx_export.torch_export import ExportOptions, export_onnx
    from edgegate.snn.neurocorex import SIZE, WORD_MAX
    from edgegate.zoo.training import cross_entropy, deterministic, fit, tensors

    data = zoo.entry("threshold_gate").load_data()
    with deterministic(0):
        model = torch.nn.Sequential(torch.nn.Linear(64, 10))
        fit(model, *tensors(data, "train"), cross_entropy, epochs=30, batch_size=64, lr=1e-2, seed=0)
    model.eval()
    calib, test = split_data(data)
    proto = export_onnx(model, torch.from_numpy(test.input()[:4]), "x", ExportOptions())
    source = _source_accuracy(proto, test.input(), test.labels)
    acc, _ = _snn(proto, calib.input(), test.input(), test.labels, tmp_path, timesteps=128)
    print(f"64->10 digits: source {source:.4f}, snn T=128 {acc:.4f}")
    assert source > 0.9 and acc >= source - 0.01
    ctx = CompileContext(input_name="x", output_names=("logits",), calibration=calib.input())
    art = TARGET.compile(proto, TARGET.options_for_export({"neurocorex": "true"}, ctx), tmp_path)
    blob = art.files["neurocorex.bin"]
    assert len(blob) == 2 * (SIZE * SIZE + 2) + 1 + 3 * 3 * SIZE
    net = TARGET.load(art).network
    ff = np.frombuffer(blob, np.int8, SIZE * SIZE, SIZE * SIZE + 3).reshape(SIZE, SIZE)
    np.testing.assert_array_equal(ff[:10, :64], net.output.weight)
    words = np.frombuffer(blob, np.uint8, 3 * SIZE, 2 * SIZE * SIZE + 5).reshape(SIZE, 3).astype(np.int64)
    theta = words[:, 0] | words[:, 1] << 8 | words[:, 2] << 16
    assert (theta[10:] == WORD_MAX).all() and (theta[:10] == np.rint(net.output.threshold / 256)).all()


def test_neurocorex_refuses_networks_over_90_neurons(exported, tmp_path):
    from edgegate.errors import TargetError

    proto, calib, _, _ = exported("threshold_gate", "fp32")
    ctx = CompileContext(input_name="x", output_names=("logits",), calibration=calib)
    with pytest.raises(TargetError, match="at most 90 neurons, the network has 138"):
        TARGET.compile(proto, TARGET.options_for_export({"neurocorex": "true"}, ctx), tmp_path)


def test_convolutions_unroll_to_sparse_synapses(tmp_path):
    """Conv + ReLU (stride 2 for downsampling) -> Flatten -> Linear, trained here on 8x8 digits."""
    from edgegate.data import load_data, split_data
    from edgegate.onnx_export.torch_export import ExportOptions, export_onnx
    from edgegate.snn.network import SynapseFormat
    from edgegate.zoo.training import cross_entropy, deterministic, fit, tensors

    data = load_data("digits", ["x"], {"x": (1, 8, 8)})
    with deterministic(0):
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                                    torch.nn.Flatten(), torch.nn.Linear(16 * 16, 10))
        fit(model, *tensors(data, "train"), cross_entropy, epochs=10, batch_size=64, lr=3e-3, seed=0)
    model.eval()
    calib, test = split_data(data)
    proto = export_onnx(model, torch.from_numpy(test.input()[:4]), "x", ExportOptions())
    source = _source_accuracy(proto, test.input(), test.labels)
    ctx = CompileContext(input_name="x", output_names=("logits",), calibration=calib.input())
    art = TARGET.compile(proto, TARGET.options_for_export({"timesteps": "128", "nir": "false"}, ctx), tmp_path)
    with TARGET.load(art) as runner:
        acc = float(np.mean(runner.run({"x": test.input()})["logits"].argmax(1) == test.labels))
        net = runner.network
    print(f"digits CNN: source {source:.4f}, snn T=128 {acc:.4f}")
    assert [g.weight.shape for g in net.groups] == [(512, 64), (256, 512), (10, 256)]
    assert [g.fmt for g in net.groups][:2] == [SynapseFormat.CSR, SynapseFormat.CSR]
    assert source > 0.9 and acc >= source - 0.01
