"""Quantize stage: config validation, the gate precision policy, brevitas layers, the QuantPlan hand-off."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from edgegate import zoo
from edgegate.calibration import calibrate
from edgegate.errors import EdgegateError
from edgegate.gates import GateKind, find_gates, register
from edgegate.quantization import QdqForm, QuantConfig, decision_layers, plan_from, quantize
from edgegate.quantization.layers import EmptySafeQuantConv2d, EmptySafeQuantLinear, quant_layer

# Layers the default policy keeps in float, per zoo model (computed from gate types, asserted by path).
FLOAT_BY_POLICY = {
    "early_exit": {"heads.0", "heads.1", "heads.2"},
    "moe": {"moe.router.proj"},
    "moe_pp": {"moe.router.proj", "moe.const_mix"},
    "channel_gate": {"gate2.predictor", "gate3.predictor"},
    "gated_attention": {"attn.gate_proj"},
    "threshold_gate": set(),
}


# ------------------------------------------------------------------------------------------------ config


def test_config_coerces_strings_and_resolves_gate_precision():
    c = QuantConfig(observer="mse", qdq_form="symmetric", calibration="naive")
    assert (c.observer, c.qdq_form, c.calibration) == ("mse", QdqForm.SYMMETRIC, "naive")
    assert not c.gates_in_float  # naive baseline: gate-unaware PTQ quantizes every layer
    assert QuantConfig().gates_in_float
    assert not QuantConfig(gate_precision="int8").gates_in_float
    assert QuantConfig(calibration="naive", gate_precision="float").gates_in_float
    d = json.loads(json.dumps(QuantConfig().to_dict()))
    assert d["gate_precision"] == "float" and d["observer"] == "percentile" and d["qdq_form"] == "asymmetric"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"observer": "max"}, "observer='max' is unknown; use one of minmax, percentile, mse"),
    ({"calibration": "smart"}, "calibration='smart'"),
    ({"scheme": "int4"}, "scheme='int4'"),
    ({"min_coverage": 0}, "min_coverage=0"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(EdgegateError, match=match):
        QuantConfig(**kwargs)


# ------------------------------------------------------------------------------------------------ policy


@pytest.mark.parametrize("name", sorted(FLOAT_BY_POLICY))
def test_quantize_swaps_every_layer_but_gate_decision_layers(name):
    model = zoo.build(name).eval()
    plain = {p for p, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}
    qmodel, swapped = quantize(model, QuantConfig(), find_gates(model))
    assert set(swapped) == plain - FLOAT_BY_POLICY[name]
    for path, q in swapped.items():
        assert qmodel.get_submodule(path) is q
        assert isinstance(q, EmptySafeQuantConv2d if isinstance(model.get_submodule(path), nn.Conv2d)
                          else EmptySafeQuantLinear)
        torch.testing.assert_close(q.weight, model.get_submodule(path).weight, rtol=0, atol=0)
    # The input model is untouched; gate_precision=int8 quantizes the decision layers too.
    assert all(type(model.get_submodule(p)) in (nn.Linear, nn.Conv2d) for p in plain)
    _, all_swapped = quantize(model, QuantConfig(gate_precision="int8"))
    assert set(all_swapped) == plain


def test_policy_follows_module_types_not_attribute_names():
    from edgegate.nn import TopKRouter

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)  # named like a router projection, but not one
            self.dispatcher = TopKRouter(4, 3, 1)  # a router under an unusual name

        def forward(self, x):
            return self.dispatcher(self.proj(x))

    model = Custom().eval()
    assert decision_layers(model, find_gates(model)) == {"dispatcher.proj": "router projection of dispatcher"}
    _, swapped = quantize(model)
    assert list(swapped) == ["proj"]


def test_user_gate_declares_its_decision_layers():
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scorer = nn.Linear(4, 1)
            self.body = nn.Linear(4, 4)

        def decision_layers(self):
            return [self.scorer]

        def forward(self, x):
            keep = (torch.sigmoid(self.scorer(x)) > 0.5).float()
            return keep * self.body(x)

    register(Skip, GateKind.CHANNEL)
    model = nn.Sequential(nn.Linear(4, 4), Skip()).eval()
    assert decision_layers(model, find_gates(model)) == {"1.scorer": "decision layer of Skip"}
    _, swapped = quantize(model)
    assert sorted(swapped) == ["0", "1.body"]


# ------------------------------------------------------------------------------------------ quant layers


@pytest.mark.parametrize("qdq_form", ["asymmetric", "symmetric"])
def test_empty_batch_passes_through_in_calibration_and_inference(qdq_form):
    from brevitas.graph.calibrate import calibration_mode

    lin = quant_layer(nn.Linear(6, 3), QuantConfig(qdq_form=qdq_form)).eval()
    conv = quant_layer(nn.Conv2d(2, 3, 3, padding=1), QuantConfig(qdq_form=qdq_form)).eval()
    with torch.no_grad(), calibration_mode(lin), calibration_mode(conv):
        assert lin(torch.zeros(0, 6)).shape == (0, 3)
        assert conv(torch.zeros(0, 2, 5, 5)).shape == (0, 3, 5, 5)
        lin(torch.randn(64, 6))
    with torch.no_grad():
        assert lin(torch.zeros(0, 6)).shape == (0, 3)
        assert torch.isfinite(lin(torch.randn(4, 6))).all()
    assert lin.input_quant.is_signed == (qdq_form == "symmetric")


class _TwoLayer(nn.Module):
    """Signed input into a Linear (asymmetric zero point != 0 on cpu), a conv on the side."""

    input_names = ("x",)

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        return self.fc(x) + self.conv(x.reshape(-1, 1, 4, 4)).flatten(1).mean(1, keepdim=True)


@pytest.mark.parametrize("qdq_form", ["asymmetric", "symmetric"])
def test_plan_reproduces_brevitas_fake_quant_in_numpy(qdq_form):
    """The hand-off is exact: QDQ of the input, int8 weights x scale, int32 bias, all from the plan."""
    torch.manual_seed(0)
    model = _TwoLayer().eval()
    x = torch.randn(256, 16) * 2 + 0.5
    qmodel, record = calibrate(model, x, QuantConfig(qdq_form=qdq_form, bias_correction=False))
    lq = record.plan.layers["fc"]
    assert lq.samples == 256 and lq.weight_int.dtype == np.int8 and lq.weight_scale.shape == (8,)
    if qdq_form == "asymmetric":
        assert not lq.act_signed and 0 < lq.act_zero_point < 255  # asymmetric uint8
    else:
        assert lq.act_signed and lq.act_zero_point == 0
    xin = x[:64].numpy()
    with torch.no_grad():
        want = qmodel.fc(x[:64]).numpy()
    lo, hi = (-128, 127) if lq.act_signed else (0, 255)
    s = np.float32(lq.act_scale)
    xq = np.clip(np.round(xin / s) + lq.act_zero_point, lo, hi)
    x_dq = ((xq - lq.act_zero_point) * s).astype(np.float32)
    bias_scale = (s * lq.weight_scale).astype(np.float32)
    bias = (np.round(lq.bias / bias_scale) * bias_scale).astype(np.float32)  # int32 bias
    got = x_dq @ lq.dequantized_weight().T + bias
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(np.abs(want).max()))
    # Conv weights read back per output channel, the same values the brevitas layer uses.
    cq = record.plan.layers["conv"]
    assert str(cq.kind) == "conv" and cq.weight_int.shape == (2, 1, 3, 3)
    np.testing.assert_array_equal(cq.dequantized_weight(), qmodel.conv.quant_weight().value.detach().numpy())
    # A cpu Conv quantizes its output too (uint8, after the bias); Linear layers and the symmetric form keep it float.
    assert lq.out_scale is None and lq.out_zero_point is None
    if qdq_form == "symmetric":
        assert cq.out_scale is None and cq.out_zero_point is None
        return
    assert cq.out_scale > 0 and 0 < cq.out_zero_point < 255  # signed conv output: asymmetric uint8
    img = x[:64].reshape(-1, 1, 4, 4)
    with torch.no_grad():
        want = qmodel.conv(img).numpy()

    def fake_quant(v, scale, zp):
        s = np.float32(scale)
        return ((np.clip(np.round(v / s) + zp, 0, 255) - zp) * s).astype(np.float32)

    bias_scale = (np.float32(cq.act_scale) * cq.weight_scale).astype(np.float32)
    y = torch.nn.functional.conv2d(torch.from_numpy(fake_quant(img.numpy(), cq.act_scale, cq.act_zero_point)),
                                   torch.from_numpy(cq.dequantized_weight()),
                                   torch.from_numpy(np.round(cq.bias / bias_scale) * bias_scale), padding=1)
    got = fake_quant(y.numpy(), cq.out_scale, cq.out_zero_point)
    # equal up to float rounding of the accumulation, which may move a value across a rounding boundary
    assert np.mean(got == want) >= 0.99
    np.testing.assert_allclose(got, want, rtol=0, atol=1.01 * cq.out_scale)
    assert set(np.unique(np.round(want / cq.out_scale, 3) % 1)) <= {0.0}  # on the output grid


def test_plan_from_reads_back_and_serializes():
    torch.manual_seed(0)
    model = _TwoLayer().eval()
    qmodel, record = calibrate(model, torch.randn(64, 16))
    plan = plan_from({"fc": qmodel.fc}, "symmetric", ("conv",), {"fc": 7})
    assert plan.qdq_form == QdqForm.SYMMETRIC and plan.float_layers == ("conv",) and plan.layers["fc"].samples == 7
    summary = json.loads(json.dumps(record.plan.to_dict()))
    assert set(summary["layers"]) == {"fc", "conv"} and summary["qdq_form"] == "asymmetric"
    assert summary["layers"]["fc"]["out_scale"] is None and summary["layers"]["conv"]["out_scale"] > 0
    json.dumps(record.to_dict())  # the whole record is manifest-ready
