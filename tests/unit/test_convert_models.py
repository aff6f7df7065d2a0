"""Tiny trained Hugging Face MoE models through conversion, gate-aware int8 calibration and ONNX export.

Per architecture (Mixtral; Qwen3-MoE without renormalization; Qwen3-Next with its gated attention,
gated shared expert and delta-net layers; DeepSeek-V3 with sigmoid scores, a score-correction bias, a
scale and a shared expert): the converted model matches transformers in torch, the exported graph has
one ``TopKGate`` per MoE layer (and a ``SigmoidGate`` per gate), ONNX Runtime's fp32 logits match
transformers, and the int8 gate-aware model keeps the top-k expert sets on held-out tokens.
"""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnxruntime as ort
import pytest
import torch

pytest.importorskip("transformers")

from edgegate.convert import convert, verify  # noqa: E402
from edgegate.data import Dataset, TensorSpec  # noqa: E402
from edgegate.gates import GateKind, find_gates  # noqa: E402
from edgegate.onnx_export.torch_export import ExportOptions, export_onnx  # noqa: E402
from edgegate.quantization.plan import Flavor  # noqa: E402
from edgegate.quantization.step import QuantOptions, quantize_for_export  # noqa: E402
from edgegate.zoo.training import deterministic  # noqa: E402
from tests.unit import _hf  # noqa: E402

# (MoE layers, sigmoid gates: gated shared experts + gated attention layers)
EXPECTED = {"mixtral": (2, 0), "qwen3_moe": (2, 0), "qwen3_next": (2, 3), "deepseek_v3": (2, 0)}
CALIB_ROWS, HELD_ROWS = 256, 256  # windows of 8 tokens
BATCH = 64  # a static batch exports faster; the default dynamic batch is exercised by the CLI tests


def _rows(data: Dataset, n: int) -> Dataset:
    step = max(1, len(data) // n)
    return data.subset(np.arange(0, len(data), step)[:n])


@pytest.fixture(scope="module", params=_hf.ARCHS)
def exported(request) -> dict:
    """One architecture converted, verified, calibrated (int8, gate-aware) and exported once."""
    arch = request.param
    original = _hf.trained(arch)
    model = copy.deepcopy(original)
    _, calib, held = _hf.markov()
    calib, held = _rows(calib, CALIB_ROWS), _rows(held, HELD_ROWS)
    with deterministic(0):  # one thread: tiny layers run faster, and the calibration is reproducible
        conversion = verify(original, convert(model), {"input_ids": calib.input()[:64]}, atol=1e-4)
        gate_map = find_gates(model)
        spec = TensorSpec("input_ids", (_hf.CONTEXT,), "int64")
        quantized = quantize_for_export(model, gate_map, QuantOptions("int8"), Flavor.CPU, calib, held, spec)
        float_graph = export_onnx(quantized.export_model, torch.from_numpy(calib.input()[:BATCH]), "input_ids",
                                  ExportOptions(batch=BATCH))
    return {"arch": arch, "original": original, "model": model, "conversion": conversion, "gate_map": gate_map,
            "quantized": quantized, "float_graph": float_graph, "int8_graph": quantized.lower(float_graph),
            "held": held}


def _ort(graph, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": x})[0]


def test_conversion_preserves_the_logits(exported):
    assert _hf.n_params(exported["original"]) < 1_000_000
    checks = exported["conversion"].checks
    assert checks["max_abs_err"] <= 1e-4 and max(checks["modules"].values()) <= 1e-4
    moe_layers, sigmoid_gates = EXPECTED[exported["arch"]]
    families = Counter(c.family for c in exported["conversion"].converted)
    assert families[GateKind.ROUTER] == moe_layers
    gates = exported["gate_map"]
    assert len(gates.by_kind(GateKind.ROUTER)) == moe_layers
    assert len(gates.by_kind(GateKind.SIGMOID)) == sigmoid_gates


def test_onnx_keeps_one_topkgate_per_moe_layer_and_the_sigmoid_gates(exported):
    nodes = exported["float_graph"].graph.node
    ops = Counter(n.op_type for n in nodes if n.domain == "edgegate")
    # Qwen3-Next's delta-net layers export in their compact form (transformers' own: ~1500 nodes a layer).
    assert len(nodes) < 600
    moe_layers, sigmoid_gates = EXPECTED[exported["arch"]]
    assert ops["TopKGate"] == moe_layers
    assert ops["SigmoidGate"] == sigmoid_gates
    # Each expert is three 2-D matrices of its own (quantized per expert, per output channel), never a
    # slice of the fused 3-D parameters.
    weights = {t.name: tuple(t.dims) for t in exported["float_graph"].graph.initializer if t.name.endswith("weight")}
    experts = [n for n in weights if ".experts." in n]
    assert len(experts) == 3 * 4 * moe_layers  # w1, w3, w2 of 4 experts per layer
    assert all(len(dims) == 2 for n, dims in weights.items() if n in experts)
    assert all(len(dims) <= 2 for dims in weights.values())


def test_fp32_onnx_runtime_matches_transformers(exported):
    x = exported["held"].input()[:BATCH]
    with torch.no_grad():
        want = exported["original"](torch.from_numpy(x)).numpy()
    got = _ort(exported["float_graph"], x)
    assert got.shape == (BATCH, _hf.CONTEXT, _hf.VOCAB)
    assert float(np.abs(got - want).max()) <= 1e-3


def test_int8_gate_aware_keeps_the_experts_on_held_out_tokens(exported):
    record = exported["quantized"].record
    fidelity = record["fidelity"]
    assert fidelity["samples"] == HELD_ROWS
    routers = {name: g for name, g in fidelity["gates"].items() if g["kind"] == "router"}
    assert len(routers) == EXPECTED[exported["arch"]][0]
    assert fidelity["summary"]["topk_set_agreement"] >= 0.98
    # Every expert of every MoE layer was calibrated on tokens routed to it, and the routers stayed float.
    assert record["plan"]["float_layers"], record["plan"]
    for router in routers:
        assert f"{router}.proj" in record["float_layers"]
    for gate in exported["gate_map"].by_kind(GateKind.SIGMOID):  # gated shared experts, gated attention
        projection = "gate" if gate.module == "GatedSharedExpert" else "gate_proj"
        assert f"{gate.name}.{projection}" in record["float_layers"]
    slots = record["calibrated"]["slots"]
    assert len(slots) == len(routers) and all(min(rows) > 0 for rows in slots.values())
    expert_layers = [p for p in record["calibrated"]["layers"] if ".experts." in p]
    assert len(expert_layers) == 3 * 4 * len(routers)  # each expert's w1, w3, w2 quantized and calibrated


def test_int8_onnx_runtime_follows_the_fake_quant_model(exported):
    x = exported["held"].input()[:BATCH]
    got = _ort(exported["int8_graph"], x)
    with torch.no_grad():
        want = exported["quantized"].reference(torch.from_numpy(x)).numpy()
    ops = Counter(n.op_type for n in exported["int8_graph"].graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["TopKGate"] == EXPECTED[exported["arch"]][0]
    assert float(np.mean(got.argmax(-1) == want.argmax(-1))) >= 0.97
