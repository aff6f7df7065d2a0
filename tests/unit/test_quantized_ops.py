"""Functional ops quantized and fused by ONNX Runtime: residual Add, Concat, squeeze-excite Mul, pooling.

Each tiny CNN goes through the int8 quantize step (BatchNorm folding, gate-aware calibration with the
functional-op quantizers, the cpu lowering) and ONNX Runtime's optimizer; the tests count op types in
the session-optimized graph and compare ORT's output with the fake-quant torch reference in output steps
(the models end on a quantized tensor, so the output has a quantization step of its own).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.models import BasicBlock
from edgegate.data import Dataset, TensorSpec
from edgegate.gates import find_gates
from edgegate.onnx_export.torch_export import export_onnx
from edgegate.quantization.fold import fold_batchnorm
from edgegate.quantization.plan import QdqForm
from edgegate.quantization.step import QuantOptions, quantize_for_export

sys.path.insert(0, str(Path(__file__).parent))
from _ort import optimized_op_types, session  # noqa: E402

SIZE = 16


class ResidualNet(nn.Module):
    """Stem, max-pool, two residual blocks (one with a downsample conv), global average pool: the output is
    the pooled features (a quantized tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.blocks = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 16, 2))  # torchvision's, as benchmarks run it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn(self.stem(x))))
        return torch.flatten(F.adaptive_avg_pool2d(self.blocks(x), 1), 1)


class ConcatExcite(nn.Module):
    """Two conv branches concatenated, squeeze-excite (pool, 1x1 convs, hardsigmoid, Mul), hardswish."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(3, 8, 1)
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.out = nn.Conv2d(16, 16, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        h = h * F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(h, 1)))))
        return torch.flatten(F.adaptive_avg_pool2d(F.hardswish(self.out(h)), 1), 1)


def _init(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Seeded weights, BatchNorm statistics from ``x`` (train-mode forward), eval mode."""
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.fixture(scope="module")
def lowered():
    cache = {}

    def get(cls):
        if cls not in cache:
            torch.manual_seed(0)
            x = torch.randn(80, 3, SIZE, SIZE)
            model = _init(cls(), x[:48])
            q = quantize_for_export(model, find_gates(model), QuantOptions(scheme="int8", observer="minmax"),
                                    QdqForm.ASYMMETRIC, Dataset("calib", {"x": x[:48].numpy()}, None), None,
                                    TensorSpec("x", (3, SIZE, SIZE), "float32"))
            proto = q.lower(export_onnx(q.export_model, x[:2], "x"))
            cache[cls] = (q, proto, x[48:])
        return cache[cls]

    return get


def _output_step(q) -> float:
    """The output's quantization step: the last op is the flatten of the quantized average pool."""
    ops = q.record["plan"]["ops"]
    return next(v["out_scale"] for k, v in ops.items() if k.startswith(":avg_pool"))


def _steps(q, proto, x: torch.Tensor) -> float:
    got = session(proto).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        want = q.reference(x).numpy()
    return float(np.abs(got - want).max() / _output_step(q))


def test_residual_adds_run_as_qlinearadd(lowered):
    q, proto, x = lowered(ResidualNet)
    ops = optimized_op_types(proto)
    # Every residual Add is fused, none is left in float; convs, max pool and the pool run on uint8.
    assert ops["QLinearAdd"] == 2 and ops["Add"] == 0, ops
    assert ops["QLinearConv"] == 6 and ops["QLinearGlobalAveragePool"] == 1, ops
    assert ops["Conv"] == 0 and ops["MaxPool"] == 0 and ops["Relu"] == 0, ops
    assert ops["DequantizeLinear"] <= 1 and ops["QuantizeLinear"] == 1, ops  # the input's Q, the output's DQ
    plan = q.record["plan"]
    assert sorted(k for k in plan["ops"] if ":add#" in k) == ["blocks.0:add#0", "blocks.1:add#0"]
    assert all(plan["ops"][k]["out_after_relu"] for k in ("blocks.0:add#0", "blocks.1:add#0"))
    assert plan["ops"]["blocks.0:add#0"]["out_zero_point"] == 0  # post-ReLU: ORT folds the Relu away
    assert sorted(q.record["folded_batchnorm"]) == ["blocks.0.bn1", "blocks.0.bn2", "blocks.1.bn1", "blocks.1.bn2",
                                                    "blocks.1.downsample.1", "bn"]


def test_residual_output_within_two_steps_of_reference(lowered):
    q, proto, x = lowered(ResidualNet)
    assert _steps(q, proto, x) <= 2.0


def test_concat_and_excite_mul_fuse(lowered):
    q, proto, x = lowered(ConcatExcite)
    ops = optimized_op_types(proto)
    assert ops["QLinearConcat"] == 1 and ops["Concat"] == 0, ops
    assert ops["QLinearMul"] >= 1 and ops["QLinearGlobalAveragePool"] == 2, ops
    kinds = {v["kind"] for v in q.record["plan"]["ops"].values()}
    assert {"cat", "mul", "avg_pool", "hardsigmoid", "hardswish"} <= kinds
    assert _steps(q, proto, x) <= 2.0


def test_float_residual_stream_is_not_quantized():
    """Adds of float Linear outputs (a transformer's residual stream) stay float: nothing would fuse."""
    from edgegate.calibration import calibrate
    from edgegate.quantization.config import QuantConfig

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(x + F.relu(self.fc1(x)))

    torch.manual_seed(0)
    _, record = calibrate(Mlp().eval(), torch.randn(64, 8), QuantConfig())
    assert record.plan.ops == {} and set(record.plan.layers) == {"fc1", "fc2"}


def test_fold_batchnorm_keeps_outputs_and_skips_shared_conv_outputs():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.c2, self.b2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.b1(self.c1(x))
            y = self.c2(h)
            return self.b2(y) + y  # c2's output has a second reader: its BatchNorm cannot fold

    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    model = _init(Shared(), x)
    folded, pairs = fold_batchnorm(model, x[:4])
    assert pairs == {"b1": "c1"} and isinstance(folded.b1, nn.Identity) and isinstance(folded.b2, nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert isinstance(model.b1, nn.BatchNorm2d)  # the input model is unchanged
