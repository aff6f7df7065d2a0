"""insert_qdq: QDQ placement per qdq_form, ORT vs a torch fake-quant simulation, ORT's int8 fusion on x86.

Plans are built here by hand (minmax activation ranges from hooks, per-channel absmax int8 weights),
as calibration would hand them over. Errors are measured in output quantization steps: the step of
an 8-bit minmax quantizer over the simulated output.
"""

from __future__ import annotations

import collections
import copy
import dataclasses

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from _ort import optimized_op_types
from _ort import session as _session
from torch import nn

from edgegate import zoo
from edgegate.errors import ExportError
from edgegate.onnx_export.passes import iter_nodes
from edgegate.onnx_export.passes.insert_qdq import insert_qdq
from edgegate.onnx_export.torch_export import ExportOptions, export_onnx
from edgegate.quantization.plan import LayerKind, LayerQuant, QdqForm, QuantPlan

FLOAT_COMPUTE = {"Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul", "FusedGemm", "NhwcFusedConv"}


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(F.max_pool2d(h, 2).flatten(1))


class ResidualConvNet(nn.Module):
    """conv -> relu -> conv plus a 1x1 skip conv: two Conv outputs feed a float Add (a residual)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.skip = nn.Conv2d(1, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))) + self.skip(x))
        return self.fc(F.max_pool2d(h, 2).flatten(1))


class TokenMLP(nn.Module):
    """Linears on [B, T, C]: exported as MatMul on a constant-folded W^T + Add."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _minmax(a: np.ndarray, qdq_form: QdqForm) -> tuple[float, int, bool]:
    """(scale, zero point, signed): asymmetric uint8 over [min(a, 0), max(a, 0)] (cpu), symmetric int8 (trt)."""
    if qdq_form is QdqForm.ASYMMETRIC:
        lo, hi = min(float(a.min()), 0.0), max(float(a.max()), 0.0)
        scale = (hi - lo) / 255
        return scale, int(np.clip(round(-lo / scale), 0, 255)), False
    return float(np.abs(a).max()) / 127, 0, True


def make_plan(model: nn.Module, x: torch.Tensor, qdq_form: QdqForm, float_layers: tuple[str, ...] = (),
              per_tensor: bool = False, conv_outputs: bool = False) -> QuantPlan:
    """Minmax plan: asymmetric uint8 activations (cpu) or symmetric int8 (trt); int8 absmax weights;
    ``conv_outputs``: Convs get an output quantizer too (what calibration gives the asymmetric form)."""
    mods = {n: m for n, m in _layers(model).items() if n not in float_layers}
    seen: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    out: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a[0].detach().numpy().ravel()))
             for n, m in mods.items()]
    hooks += [m.register_forward_hook(lambda _m, _a, y, n=n: out[n].append(y.detach().numpy().ravel()))
              for n, m in mods.items() if conv_outputs and isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    layers = {}
    for n, m in mods.items():
        scale, zp, signed = _minmax(np.concatenate(seen[n]), qdq_form)
        w = m.weight.detach().numpy()
        ws = (np.abs(w.reshape(1 if per_tensor else len(w), -1)).max(1) / 127).astype(np.float32)
        wi = np.clip(np.round(w / ws.reshape((-1,) + (1,) * (w.ndim - 1))), -127, 127).astype(np.int8)
        kind = LayerKind.CONV if isinstance(m, nn.Conv2d) else LayerKind.LINEAR
        o_scale, o_zp = _minmax(np.concatenate(out[n]), qdq_form)[:2] if n in out else (None, None)
        layers[n] = LayerQuant(n, kind, scale, zp, signed, wi, ws, m.bias.detach().numpy().copy(), len(seen[n]),
                               out_scale=o_scale, out_zero_point=o_zp)
    return QuantPlan(qdq_form, layers, float_layers)


def simulate(model: nn.Module, plan: QuantPlan) -> nn.Module:
    """Torch fake-quant twin: quantized input, dequantized weight, bias on the int32 grid (brevitas Int32Bias)."""
    sim = copy.deepcopy(model).eval()
    mods = _layers(sim)
    for name, q in plan.layers.items():
        m = mods[name]
        lo, hi = (-128, 127) if q.act_signed else (0, 255)

        def fake_quant(_m, args, q=q, lo=lo, hi=hi):
            x = torch.clamp(torch.round(args[0] / q.act_scale) + q.act_zero_point, lo, hi)
            return ((x - q.act_zero_point) * q.act_scale,)

        m.register_forward_pre_hook(fake_quant)
        if q.out_scale is not None:
            def fake_quant_output(_m, _args, y, q=q, lo=lo, hi=hi):
                y = torch.clamp(torch.round(y / q.out_scale) + q.out_zero_point, lo, hi)
                return (y - q.out_zero_point) * q.out_scale

            m.register_forward_hook(fake_quant_output)
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(q.dequantized_weight()))
            s = np.float32(q.act_scale) * q.weight_scale
            m.bias.copy_(torch.from_numpy(np.round(q.bias / s).astype(np.float32) * s))
    return sim






def steps(got: np.ndarray, want: np.ndarray) -> float:
    """Max error in steps of an 8-bit minmax quantizer of the reference output."""
    step = (float(want.max()) - float(want.min())) / 255
    return float(np.abs(got - want).max()) / step


def _count(proto: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in iter_nodes(proto.graph))


def _check(proto: onnx.ModelProto) -> None:
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)


def _dq_inputs(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    inits = {t.name: t for g in _graphs(proto.graph) for t in g.initializer}
    return {n.output[0]: inits.get(n.input[0]) for n in iter_nodes(proto.graph) if n.op_type == "DequantizeLinear"}


def _graphs(g: onnx.GraphProto):
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)


# ------------------------------------------------------------------------------------------------ cpu


@pytest.mark.parametrize("net,shape", [(ConvNet, (32, 1, 8, 8)), (TokenMLP, (8, 5, 16))])
def test_cpu_flavor_matches_simulation_and_fuses_every_layer(net, shape):
    torch.manual_seed(0)
    model, x = net().eval(), torch.randn(*shape)
    plan = make_plan(model, x, QdqForm.ASYMMETRIC)
    proto = insert_qdq(export_onnx(model, x), plan)
    _check(proto)

    n = len(plan.layers)
    ops = _count(proto)
    matmul = net is TokenMLP
    assert ops["QuantizeLinear"] == n
    assert ops["DequantizeLinear"] == (2 if matmul else 3) * n  # activation, weight (, int32 bias)
    inits = {t.name: t for t in proto.graph.initializer}
    for name in plan.layers:
        assert f"{name}.weight" not in inits
        assert inits[f"{name}.weight_quantized"].data_type == onnx.TensorProto.INT8
        assert inits[f"{name}.input_zero_point"].data_type == onnx.TensorProto.UINT8
        q, to_array = plan.layers[name], onnx.numpy_helper.to_array
        want_bias = np.round(q.bias.astype(np.float64) / (q.act_scale * q.weight_scale.astype(np.float64)))
        if matmul:  # float values on the int32 grid, for ORT's MatMulIntegerToFloat + Add
            got_bias = to_array(inits[f"{name}.bias_rounded"]) / to_array(inits[f"{name}.weight_scale"]) / q.act_scale
            np.testing.assert_allclose(got_bias, want_bias, atol=1e-3)
        else:
            assert inits[f"{name}.bias_quantized"].data_type == onnx.TensorProto.INT32
            np.testing.assert_array_equal(to_array(inits[f"{name}.bias_quantized"]), want_bias)
    # no float weight left behind: every 2-D+ float initializer is gone
    assert not [t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 1]

    xt = torch.randn(*shape)
    with torch.no_grad():
        want = simulate(model, plan)(xt).numpy()
    got = _session(proto).run(None, {"input": xt.numpy()})[0]
    assert steps(got, want) <= 2

    fused = optimized_op_types(proto)
    assert not FLOAT_COMPUTE & set(fused), fused
    if matmul:
        assert fused["MatMulIntegerToFloat"] == n
    else:
        assert fused["QLinearConv"] == 2 and fused["QGemm"] == 1


def test_conv_output_quantizer_makes_convs_before_float_ops_fuse():
    """A Conv feeding a float Add stays float on ORT x86 unless a QuantizeLinear follows it."""
    torch.manual_seed(3)
    model, x = ResidualConvNet().eval(), torch.randn(32, 1, 8, 8)
    inputs_only = insert_qdq(export_onnx(model, x), make_plan(model, x, QdqForm.ASYMMETRIC))
    fused = optimized_op_types(inputs_only)
    assert fused["QLinearConv"] == 1 and fused["Conv"] + fused["FusedConv"] == 2, fused  # the gap

    plan = make_plan(model, x, QdqForm.ASYMMETRIC, conv_outputs=True)
    proto = insert_qdq(export_onnx(model, x), plan)
    _check(proto)
    assert _count(proto)["QuantizeLinear"] == len(plan.layers) + 3  # inputs, and the three Conv outputs
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    for name in ("conv1", "conv2", "skip"):
        q = plan.layers[name]
        assert inits[f"{name}.output_zero_point"].dtype == np.uint8
        assert inits[f"{name}.output_zero_point"] == q.out_zero_point
        assert np.isclose(inits[f"{name}.output_scale"], q.out_scale)
    fused = optimized_op_types(proto)
    assert fused["QLinearConv"] == 3 and fused["QGemm"] == 1 and not FLOAT_COMPUTE & set(fused), fused

    xt = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        want = simulate(model, plan)(xt).numpy()
    assert steps(_session(proto).run(None, {"input": xt.numpy()})[0], want) <= 2


def test_bad_output_quantizer_raises():
    torch.manual_seed(0)
    model, x = ResidualConvNet().eval(), torch.randn(4, 1, 8, 8)
    plan = make_plan(model, x, QdqForm.ASYMMETRIC, conv_outputs=True)
    proto = export_onnx(model, x)
    for change, match in [({"out_zero_point": None}, "give both or neither"),
                          ({"out_scale": 0.0}, "output scale must be finite and > 0"),
                          ({"out_zero_point": 300}, r"output zero point 300 is outside \[0, 255\]")]:
        bad = dataclasses.replace(plan.layers["conv2"], **change)
        with pytest.raises(ExportError, match=f"layer conv2: .*{match}"):
            insert_qdq(proto, QuantPlan(QdqForm.ASYMMETRIC, {**plan.layers, "conv2": bad}))
    trt = make_plan(model, x, QdqForm.SYMMETRIC)
    bad = dataclasses.replace(trt.layers["skip"], out_scale=0.1, out_zero_point=3)
    with pytest.raises(ExportError, match=r"layer skip: output zero point 3 .*the symmetric form needs 0"):
        insert_qdq(proto, QuantPlan(QdqForm.SYMMETRIC, {**trt.layers, "skip": bad}))


def _exit_model_and_plan(zoo_model, qdq_form: QdqForm, float_layers: tuple[str, ...] = ()):
    model, _ = zoo_model("early_exit")
    calib = zoo.example_inputs("early_exit", 256)[0]
    return model, make_plan(model, calib, qdq_form, float_layers), zoo.example_inputs("early_exit", 96)[0][64:]


def test_early_exit_if_form_quantizes_inside_subgraphs(zoo_model):
    model, plan, x = _exit_model_and_plan(zoo_model, QdqForm.ASYMMETRIC)
    proto = insert_qdq(export_onnx(model, x[:1], options=ExportOptions(batch=1)), plan)
    _check(proto)
    branches = [a.g for n in iter_nodes(proto.graph) if n.op_type == "If" for a in n.attribute]
    deep = [g for g in branches if any(n.op_type == "Gemm" for n in g.node)]
    assert deep and all(sum(n.op_type == "QuantizeLinear" for n in g.node) == sum(n.op_type == "Gemm" for n in g.node)
                        for g in deep)
    assert _count(proto)["QuantizeLinear"] == len(plan.layers) == 6
    assert not any(t.name.endswith(".weight") for g in _graphs(proto.graph) for t in g.initializer)

    sim, sess = simulate(model, plan), _session(proto)
    errs, agree = [], 0
    for row in x:
        with torch.no_grad():
            want_logits, want_exit = (t.numpy() for t in sim(row[None]))
        got_logits, got_exit = sess.run(None, {"input": row[None].numpy()})
        if got_exit[0] == want_exit[0]:
            agree += 1
            errs.append(np.abs(got_logits - want_logits).max())
    assert agree >= len(x) - 1  # a rounding tie may flip one exit decision
    with torch.no_grad():
        ref = sim(x)[0].numpy()
    assert max(errs) / ((ref.max() - ref.min()) / 255) <= 2

    fused = optimized_op_types(proto)
    assert fused["QGemm"] == 6 and not FLOAT_COMPUTE & set(fused), fused


def test_early_exit_compaction_form(zoo_model):
    model, plan, x = _exit_model_and_plan(zoo_model, QdqForm.ASYMMETRIC)
    proto = insert_qdq(export_onnx(model, x), plan)
    _check(proto)
    with torch.no_grad():
        want_logits, want_exit = (t.numpy() for t in simulate(model, plan)(x))
    got_logits, got_exit = _session(proto).run(None, {"input": x.numpy()})
    same = got_exit == want_exit
    assert same.sum() >= len(x) - 1
    assert steps(got_logits[same], want_logits[same]) <= 2
    fused = optimized_op_types(proto)
    assert fused["QGemm"] == 6 and not FLOAT_COMPUTE & set(fused), fused


def test_per_tensor_weight_scale_gives_scalar_dequantize():
    torch.manual_seed(2)
    model, x = ConvNet().eval(), torch.randn(16, 1, 8, 8)
    plan = make_plan(model, x, QdqForm.ASYMMETRIC, per_tensor=True)
    proto = insert_qdq(export_onnx(model, x), plan)
    _check(proto)
    inits = {t.name: t for t in proto.graph.initializer}
    weight_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and "weight_quantized" in n.input[0]]
    assert len(weight_dq) == 3 and all(not n.attribute and not inits[n.input[1]].dims for n in weight_dq)
    with torch.no_grad():
        want = simulate(model, plan)(x).numpy()
    assert steps(_session(proto).run(None, {"input": x.numpy()})[0], want) <= 2
    assert optimized_op_types(proto)["QLinearConv"] == 2


# ------------------------------------------------------------------------------------------------ trt


@pytest.mark.parametrize("net,shape", [(ConvNet, (16, 1, 8, 8)), (TokenMLP, (4, 5, 16))])
def test_trt_flavor_places_symmetric_qdq_and_keeps_bias_float(net, shape):
    torch.manual_seed(1)
    model, x = net().eval(), torch.randn(*shape)
    plan = make_plan(model, x, QdqForm.SYMMETRIC)
    proto = insert_qdq(export_onnx(model, x), plan)
    _check(proto)
    inits = {t.name: t for t in proto.graph.initializer}
    dq_of = _dq_inputs(proto)
    producers = {o: n for n in proto.graph.node for o in n.output}
    compute = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(compute) == len(plan.layers)
    for node in compute:
        act = producers[node.input[0]]
        assert act.op_type == "DequantizeLinear" and producers[act.input[0]].op_type == "QuantizeLinear"
        zp = onnx.numpy_helper.to_array(inits[act.input[2]])
        assert zp.dtype == np.int8 and zp == 0
        w = dq_of[node.input[1]]
        assert w is not None and w.data_type == onnx.TensorProto.INT8
        if node.op_type != "MatMul":  # bias stays float, on brevitas' int32 grid
            q = plan.layers[node.input[1].split(".weight_dequantized")[0]]
            bias = inits[node.input[2]]
            assert bias.data_type == onnx.TensorProto.FLOAT and bias.name.endswith(".bias_rounded")
            on_grid = onnx.numpy_helper.to_array(bias) / (np.float32(q.act_scale) * q.weight_scale)
            np.testing.assert_allclose(on_grid, np.round(on_grid), atol=1e-3)
    assert not any(t.data_type == onnx.TensorProto.INT32 for t in proto.graph.initializer)
    with torch.no_grad():
        want = simulate(model, plan)(x).numpy()
    assert steps(_session(proto).run(None, {"input": x.numpy()})[0], want) <= 2


# ------------------------------------------------------------------------------------------------ errors


def test_float_layers_are_left_untouched(zoo_model):
    model, plan, x = _exit_model_and_plan(zoo_model, QdqForm.ASYMMETRIC, float_layers=("heads.0", "heads.1", "heads.2"))
    proto = insert_qdq(export_onnx(model, x), plan)
    _check(proto)
    gemms = {n.input[1]: n for n in proto.graph.node if n.op_type == "Gemm"}
    for k in range(3):
        assert f"heads.{k}.weight" in gemms  # float weight read directly, no DQ in front of the head
        producers = {o: n.op_type for n in proto.graph.node for o in n.output}
        assert producers.get(gemms[f"heads.{k}.weight"].input[0]) != "DequantizeLinear"
    assert _count(proto)["QuantizeLinear"] == 3


def test_unmatched_layer_and_conflicting_plan_raise():
    torch.manual_seed(0)
    model, x = ConvNet().eval(), torch.randn(4, 1, 8, 8)
    plan = make_plan(model, x, QdqForm.ASYMMETRIC)
    proto = export_onnx(model, x)
    ghost = QuantPlan(QdqForm.ASYMMETRIC, {**plan.layers, "body.proj": plan.layers["fc"]})
    with pytest.raises(ExportError, match=r"body\.proj"):
        insert_qdq(proto, ghost)
    with pytest.raises(ExportError, match="both quantized and float"):
        insert_qdq(proto, QuantPlan(QdqForm.ASYMMETRIC, plan.layers, ("fc",)))
    wrong = dict(plan.layers)
    wrong["fc"] = LayerQuant("fc", LayerKind.LINEAR, 0.1, 0, False, np.zeros((10, 7), np.int8),
                             np.ones(10, np.float32), None, 1)
    with pytest.raises(ExportError, match="layer fc: ONNX weight fc.weight has shape"):
        insert_qdq(proto, QuantPlan(QdqForm.ASYMMETRIC, wrong))
    trt_asym = QuantPlan(QdqForm.SYMMETRIC, plan.layers)  # cpu plan: conv1's input zero point is not 0
    with pytest.raises(ExportError, match="the symmetric form needs activation zero point 0"):
        insert_qdq(proto, trt_asym)


def test_matmul_layer_found_by_weight_values_when_scopes_are_gone():
    torch.manual_seed(0)
    model, x = TokenMLP().eval(), torch.randn(4, 5, 16)
    plan = make_plan(model, x, QdqForm.ASYMMETRIC)
    proto = export_onnx(model, x)
    for n in proto.graph.node:
        del n.metadata_props[:]  # as inside If subgraphs, where the exporter cuts the module path
    out = insert_qdq(proto, plan)
    _check(out)
    assert _count(out)["MatMul"] == 2 and _count(out)["QuantizeLinear"] == 2
    with torch.no_grad():
        want = simulate(model, plan)(x).numpy()
    assert steps(_session(out).run(None, {"input": x.numpy()})[0], want) <= 2
