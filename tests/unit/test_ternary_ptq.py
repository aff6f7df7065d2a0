"""Post-training ternary conversion and the calibration-weighted low-rank correction."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgegate import zoo
from edgegate.onnx_export.torch_export import export_onnx
from edgegate.quantization.ternary import TernaryPTQLinear, fit_lowrank, ternarize_model, ternarize_weight


def test_ternarize_weight_codes_and_least_squares_scale():
    w = torch.randn(16, 40)
    codes, scale = ternarize_weight(w)
    assert set(codes.unique().tolist()) <= {-1.0, 0.0, 1.0} and scale.shape == ()
    absmean = w.abs().mean()
    assert torch.norm(w - codes * scale) <= torch.norm(w - codes * absmean) + 1e-6


def test_fit_lowrank_is_optimal_under_the_activation_weighting():
    g = torch.Generator().manual_seed(0)
    err = torch.randn(12, 20, generator=g)
    # anisotropic activations: a few input directions carry most of the energy
    x = torch.randn(500, 20, generator=g) * torch.logspace(1, -2, 20)
    a, b = fit_lowrank(err, x, rank=3)
    a_plain, b_plain = fit_lowrank(err, None, rank=3)  # unweighted truncated SVD

    def weighted(a, b):
        return torch.norm((err - b @ a) @ x.T).item()

    assert weighted(a, b) < 0.9 * weighted(a_plain, b_plain)
    a_full, b_full = fit_lowrank(err, x, rank=20)
    assert weighted(a_full, b_full) < 1e-3 * torch.norm(err @ x.T).item()


@pytest.fixture(scope="module")
def lm(zoo_model):
    model, _ = zoo_model("float_lm")
    data = zoo.entry("float_lm").load_data()
    val, test = data.split("val"), data.split("test")
    return model, torch.from_numpy(val.input()), torch.from_numpy(test.input()), torch.from_numpy(test.labels)


def _loss(model, x, y) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def test_lowrank_recovers_the_ternary_gap_on_the_float_lm(lm):
    model, calib, x, y = lm
    float_loss = _loss(model, x, y)
    ternary, report = ternarize_model(model, calib, keep_float=set(), rank=0)
    corrected, _ = ternarize_model(model, calib, keep_float=set(), rank=8)
    gap = _loss(ternary, x, y) - float_loss
    recovered = (_loss(ternary, x, y) - _loss(corrected, x, y)) / gap
    assert gap > 0.15
    assert recovered >= 0.4, f"low-rank correction recovered {recovered:.0%} of a {gap:.3f}-nat gap"
    assert set(report.layers) == {"fc1", "fc2", "head"} and report.kept_float == ()
    assert all(isinstance(model_m, TernaryPTQLinear) for n, model_m in ternary.named_modules() if n in report.layers)


def test_keep_float_layers_stay_float(lm):
    model, calib, _, _ = lm
    converted, report = ternarize_model(model, calib, keep_float={"head"}, rank=0)
    assert type(converted.head) is nn.Linear and report.kept_float == ("head",)
    assert type(model.fc1) is nn.Linear  # the input model is left alone


def test_ternary_export_is_two_bit_packed_and_matches_torch(lm):
    model, calib, x, _ = lm
    converted, report = ternarize_model(model, calib, keep_float=set(), rank=8)
    proto = export_onnx(converted, x[:8], "tokens")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if n.op_type == "TernaryMatMul"]
    assert len(nodes) == 3 and sum(n.op_type == "LowRankCorrection" for n in proto.graph.node) == 3
    weights = sum(next(a.i for a in n.attribute if a.name == "in_features") * inits[n.input[1]].shape[0]
                  for n in nodes)
    stored_bits = sum(inits[n.input[1]].nbytes * 8 + inits[n.input[2]].nbytes * 8 for n in nodes)
    assert stored_bits / weights <= 2.2
    assert report.bits_per_weight() == pytest.approx(stored_bits / weights)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"tokens": x[:256].numpy()})
    with torch.no_grad():
        want = converted(x[:256]).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
