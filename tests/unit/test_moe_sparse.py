"""The sparse MoE export form (cpu): RoutedExperts -> QMoE / per-expert gather-scatter, against the dense form.

Every case runs ONNX Runtime on the lowered graph and on the dense export of the same model: float outputs
must agree to float rounding, int8 outputs (the same hand-made plan on both) within a few output steps.
Routing is forced so that tokens reach the zero / copy / constant slots and one expert receives no token.
"Not computed" is checked with poisoned weights: an expert whose weights (or scales) are NaN must leave
the output finite when no row routes to it with a non-zero weight.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from _ort import session
from onnx import helper, numpy_helper
from torch import nn

from edgegate.gates import find_gates
from edgegate.nn import MoE, TernaryLinear
from edgegate.nn.routed_experts import MoEForm, expert_params, routed_experts
from edgegate.onnx_export.passes import iter_nodes
from edgegate.onnx_export.passes.insert_qdq import insert_qdq
from edgegate.onnx_export.passes.lower_moe import DOMAIN, OP, QMOE_MAX_TOKENS, lower_routed_experts, register_schema
from edgegate.onnx_export.torch_export import ExportOptions, export_onnx
from edgegate.quantization.plan import LayerKind, LayerQuant, QdqForm, QuantPlan
from edgegate.quantization.step import QuantOptions, quantize_for_export

D, H, E = 32, 64, 4
UNUSED = 3  # the expert no token is routed to
CONFIGS = {
    "mixtral": {},
    "moe_pp_shared_sigmoid": {"n_zero": 1, "n_copy": 1, "n_const": 1, "scoring": "sigmoid", "renormalize": False,
                              "score_bias": True, "scale": -1.5, "shared_hidden": 32, "shared_gate": True},
    "gelu_bias": {"act": "gelu_tanh", "expert_bias": True},
}


class Block(nn.Module):
    """A MoE block that returns its routing, as the zoo's MoE classifier does."""

    output_names = ("y", "route_indices")

    def __init__(self, **options) -> None:
        super().__init__()
        self.moe = MoE(D, H, E, 2, router_bias=True, **options)
        with torch.no_grad():
            self.moe.router.proj.bias.zero_()
            self.moe.router.proj.bias[UNUSED] = -30.0  # never chosen
            self.moe.router.proj.bias[E:] = 0.5  # MoE++ slots: chosen by some tokens

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.moe.forward_routed(x)


@pytest.fixture(scope="module")
def exported() -> dict[str, tuple[Block, onnx.ModelProto, onnx.ModelProto, np.ndarray]]:
    """Per config: (model, dense export, sparse export, 32 input tokens); exported once for the module."""
    out = {}
    for i, (name, options) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = Block(**options).eval()
        x = torch.randn(32, D)
        dense = export_onnx(model, x, "x", ExportOptions())
        sparse = export_onnx(model, x, "x", ExportOptions(moe_form=MoEForm.SPARSE))
        out[name] = (model, dense, sparse, x.numpy())
    return out


def make_plan(model: nn.Module, x: torch.Tensor, qdq_form: QdqForm = QdqForm.ASYMMETRIC) -> QuantPlan:
    """Minmax plan as calibration hands it over: uint8 asymmetric activations, int8 absmax per-channel weights."""
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    seen: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a[0].detach().numpy().ravel()))
             for n, m in linears.items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    layers = {}
    for n, m in linears.items():
        a = np.concatenate(seen[n])
        lo, hi = min(float(a.min()), 0.0), max(float(a.max()), 0.0)
        scale = (hi - lo) / 255
        w = m.weight.detach().numpy()
        ws = (np.abs(w).max(1) / 127).astype(np.float32)
        wi = np.clip(np.round(w / ws[:, None]), -127, 127).astype(np.int8)
        bias = None if m.bias is None else m.bias.detach().numpy().copy()
        layers[n] = LayerQuant(n, LayerKind.LINEAR, scale, int(round(-lo / scale)), False, wi, ws, bias, len(a))
    return QuantPlan(qdq_form, layers)


def _run(proto: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return session(proto).run(None, {"x": x})


def _ops(proto: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in iter_nodes(proto.graph))


@pytest.mark.parametrize("name", CONFIGS)
def test_float_sparse_form_equals_dense(exported, name: str) -> None:
    model, dense, sparse, x = exported[name]
    assert _ops(sparse)[OP] == 1 and _ops(dense)[OP] == 0
    assert model.moe.export_form is MoEForm.DENSE  # the exporter put the block's own form back
    lowered = lower_routed_experts(sparse)
    onnx.checker.check_model(lowered, full_check=True)
    ops = _ops(lowered)
    assert ops[OP] == 0 and ops["TopKGate"] == 1 and ops["NonZero"] == E and ops["QMoE"] == 0
    assert DOMAIN not in {o.domain for o in lowered.opset_import}
    for rows in (x, x[:1]):
        want, got = _run(dense, rows), _run(lowered, rows)
        np.testing.assert_array_equal(got[1], want[1])  # the same routing, still a graph output
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5 * float(np.abs(want[0]).max()))
    routed = _run(lowered, x)[1]
    assert UNUSED not in routed  # an expert with no token
    if model.moe.n_zero:
        assert {E, E + 1, E + 2} <= set(routed.ravel().tolist())  # tokens in the zero, copy and const slots


@pytest.mark.parametrize("name", ["mixtral", "moe_pp_shared_sigmoid", "gelu_bias"])
def test_int8_sparse_form_equals_dense(exported, name: str) -> None:
    model, dense, sparse, x = exported[name]
    model.moe.dispatch = "dense"  # every expert sees every token: the plan calibrates all of them
    plan = make_plan(model, torch.from_numpy(x), QdqForm.ASYMMETRIC)
    model.moe.dispatch = "sparse"
    want_q = insert_qdq(dense, plan)
    got_q = insert_qdq(lower_routed_experts(sparse, plan), plan)
    onnx.checker.check_model(got_q, full_check=True)
    qmoe = name != "gelu_bias"  # QMoE runs SwiGLU experts only; gelu falls back to gather/scatter
    assert _ops(got_q)["QMoE"] == int(qmoe) and _ops(got_q)["If"] == int(qmoe)
    float_y = _run(dense, x)[0]
    step = float(np.abs(float_y).max()) / 127  # an int8 step of the output range
    for rows, tol in ((x[:QMOE_MAX_TOKENS // 2], 4), (x, 1)):
        want, got = _run(want_q, rows), _run(got_q, rows)
        np.testing.assert_array_equal(got[1], want[1])
        err = float(np.abs(got[0] - want[0]).max())
        # QMoE quantizes activations its own way (per block, per row): within a few steps of the static QDQ;
        # the int8 gather/scatter branch runs the same QDQ as the dense form on fewer rows: a fraction of one.
        assert err <= (tol if qmoe and len(rows) <= QMOE_MAX_TOKENS else 0.05) * step, (len(rows), err, step)


def _routed_graph(weights: list[np.ndarray], act: str = "silu") -> onnx.ModelProto:
    """x [T, D], w [T, E] -> RoutedExperts over ``weights`` (w1, w3, w2 per expert, initializers)."""
    register_schema()
    names = [f"experts.{e}.{p}.weight" for e in range(len(weights) // 3) for p in ("w1", "w3", "w2")]
    node = helper.make_node(OP, ["x", "w", *names], ["y"], domain=DOMAIN, act=act, bias=0, k=2)
    graph = helper.make_graph(
        [node], "routed", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["T", D]),
                           helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, ["T", E])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["T", D])],
        [numpy_helper.from_array(w, n) for w, n in zip(weights, names, strict=True)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)])


def _poison(proto: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """The same model with the float initializers in ``names`` (any graph) filled with NaN."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    hit = 0
    for g in [out.graph] + [a.g for n in iter_nodes(out.graph) for a in n.attribute if a.HasField("g")]:
        for t in g.initializer:
            if t.name in names:
                t.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(t), np.nan), t.name))
                hit += 1
    assert hit == len(names), (hit, names)
    return out


def test_zero_weight_slots_are_not_computed() -> None:
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(s).astype(np.float32) * 0.2 for _ in range(E) for s in ((H, D), (H, D), (D, H))]
    t = 6
    x = rng.standard_normal((t, D)).astype(np.float32)
    w = np.zeros((t, E), np.float32)
    w[0, [0, 1]] = 0.6, 0.4
    w[1, [1, 3]] = 0.5, 0.0  # a routed slot skipped (weight 0) on the poisoned expert
    w[2, 0] = 1.0  # the other slot went to a zero / copy / const expert
    w[4, [0, 1]] = 1.5, 0.25  # not normalized
    # rows 3 and 5: no FFN expert at all
    want = routed_experts(torch.from_numpy(x), torch.from_numpy(w), [torch.from_numpy(p) for p in weights], "silu",
                          False, 2).numpy()
    assert np.abs(want[[3, 5]]).max() == 0 and np.abs(want[[0, 1, 2, 4]]).min(1).max() > 0
    poisoned = {f"experts.{UNUSED}.w1.weight"}  # expert 3 is never given a non-zero weight
    got = session(_poison(lower_routed_experts(_routed_graph(weights)), poisoned)).run(None, {"x": x, "w": w})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    # int8: the QMoE branch (few rows) and the int8 gather/scatter branch (many rows), each poisoned.
    model = _routed_graph(weights)
    plan = make_plan(_Experts(weights), torch.from_numpy(x), QdqForm.ASYMMETRIC)
    q = insert_qdq(lower_routed_experts(model, plan), plan)
    packed = {t.name for t in q.graph.initializer if t.name.endswith(("fc1_scale", "fc2_scale"))}
    assert len(packed) == 2 and _ops(q)["QMoE"] == 1
    scales = {t.name for g in [q.graph] + [a.g for n in iter_nodes(q.graph) for a in n.attribute if a.HasField("g")]
              for t in g.initializer if t.name.startswith(f"experts.{UNUSED}.") and "weight_scale" in t.name}
    assert len(scales) == 3
    for rows in (t, 3 * QMOE_MAX_TOKENS):
        xr, wr = np.resize(x, (rows, D)), np.resize(w, (rows, E))
        ref = session(q).run(None, {"x": xr, "w": wr})[0]
        assert np.isfinite(ref).all() and np.abs(ref - np.resize(want, (rows, D))).max() < 0.05 * np.abs(want).max()
        if rows <= QMOE_MAX_TOKENS:  # poison expert 3 inside QMoE's packed scales
            poisoned_q = _poison_expert(q, packed, UNUSED)
        else:
            poisoned_q = _poison(q, scales)
        np.testing.assert_array_equal(session(poisoned_q).run(None, {"x": xr, "w": wr})[0], ref)


class _Experts(nn.Module):
    """The experts of ``_routed_graph`` as Linear modules, for make_plan (every expert sees every row)."""

    def __init__(self, weights: list[np.ndarray]) -> None:
        super().__init__()
        self.experts = nn.ModuleList()
        for e in range(len(weights) // 3):
            layer = nn.Module()
            for p, w in zip(("w1", "w3", "w2"), weights[3 * e:3 * e + 3], strict=True):
                lin = nn.Linear(w.shape[1], w.shape[0])
                with torch.no_grad():
                    lin.weight.copy_(torch.from_numpy(w))
                    lin.bias.zero_()
                setattr(layer, p, lin)
            self.experts.append(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(e.w2(torch.nn.functional.silu(e.w1(x)) * e.w3(x)) for e in self.experts)


def _poison_expert(proto: onnx.ModelProto, names: set[str], expert: int) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for t in out.graph.initializer:
        if t.name in names:
            a = numpy_helper.to_array(t).copy()
            a[expert] = np.nan
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    return out


def test_experts_that_are_not_plain_linear_export_dense() -> None:
    moe = MoE(D, H, E, 2)
    assert len(expert_params(moe.experts)) == 3 * E
    moe.experts[1].w3 = TernaryLinear(D, H, bias=False)
    assert expert_params(moe.experts) is None  # the block keeps the dense form


def test_skipped_slots_add_nothing_and_overwrite_nothing() -> None:
    """A slot marked skipped (index -1, weight 0, as expert skipping marks it) is not computed and does not
    clear the weight of a routed slot in the last column of the dense routing matrix."""
    torch.manual_seed(0)
    moe = MoE(D, H, E, 2).eval()
    x = torch.randn(3, D)
    indices = torch.tensor([[E - 1, -1], [0, 1], [-1, -1]])
    weights = torch.tensor([[0.7, 0.0], [0.5, 0.5], [0.0, 0.0]])
    with torch.no_grad():
        got = moe.sparse_export(x, weights, indices, expert_params(moe.experts))
        want = torch.stack([0.7 * moe.experts[E - 1](x[0]), 0.5 * moe.experts[0](x[1]) + 0.5 * moe.experts[1](x[1]),
                            torch.zeros(D)])
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def mixtral():
    """The tiny trained Mixtral converted to edgegate.nn (shared with test_convert_models' session cache)."""
    pytest.importorskip("transformers")
    from edgegate.convert import convert
    from tests.unit import _hf

    original = _hf.trained("mixtral")
    model = _hf.trained("mixtral")
    convert(model)
    _, calib, held = _hf.markov()
    return original, model.eval(), calib.subset(np.arange(64)), held


def test_converted_hf_moe_takes_the_sparse_path(mixtral) -> None:
    """Mixtral's converted blocks export as RoutedExperts and lower to gather/scatter (fp32, equal to
    transformers) and to If(QMoE, int8 gather/scatter) (int8, following the fake-quant model); the routing stays
    one TopKGate per layer."""
    original, model, calib, held = mixtral
    ids = held.input()[:4]
    q = quantize_for_export(model, find_gates(model), QuantOptions("int8", fidelity_target=0.0), QdqForm.ASYMMETRIC,
                            calib, None, None)
    sparse = export_onnx(q.export_model, torch.from_numpy(ids), "input_ids", ExportOptions(moe_form=MoEForm.SPARSE))
    assert _ops(sparse)[OP] == 2 and _ops(sparse)["TopKGate"] == 2
    lowered = lower_routed_experts(sparse)
    assert _ops(lowered)["NonZero"] == 2 * 4 and _ops(lowered)[OP] == 0
    with torch.no_grad():
        want = original(torch.from_numpy(ids)).numpy()
    assert float(np.abs(session(lowered).run(None, {"input_ids": ids})[0] - want).max()) <= 1e-3

    int8 = q.lower(sparse)
    onnx.checker.check_model(int8, full_check=True)
    assert _ops(int8)["QMoE"] == 2 and _ops(int8)["If"] == 2 and _ops(int8)["TopKGate"] == 2
    for rows in (ids[:1], ids):  # 8 tokens: QMoE; 32 tokens: int8 gather/scatter
        got = session(int8).run(None, {"input_ids": rows})[0]
        with torch.no_grad():
            ref = q.reference(torch.from_numpy(rows)).numpy()
        assert float(np.mean(got.argmax(-1) == ref.argmax(-1))) >= 0.95, len(rows)
        assert float(np.abs(got - ref).max()) <= 0.1 * float(np.abs(ref).max()), len(rows)


def test_latency_aware_pass_decides_the_gather_scatter_branch_and_keeps_qmoe(exported) -> None:
    """The cpu target's latency-aware pass times the int8 gather/scatter branch against its float form (at more
    tokens than QMoE takes), records the decision, and leaves the QMoE branch and the routing output alone."""
    from edgegate.onnx_export.passes.float_regions import sparse_moe_switches, switch_branch_to_float
    from edgegate.targets.cpu import CpuOptions
    from edgegate.targets.cpu_latency import MOE_BATCH, keep_fast_regions

    model, dense, sparse, x = exported["mixtral"]
    model.moe.dispatch = "dense"
    plan = make_plan(model, torch.from_numpy(x), QdqForm.ASYMMETRIC)
    model.moe.dispatch = "sparse"
    q = insert_qdq(lower_routed_experts(sparse, plan), plan)
    (switch,) = sparse_moe_switches(q)
    floated = switch_branch_to_float(q, switch)
    onnx.checker.check_model(floated, full_check=True)
    branches = {a.name: a.g for n in floated.graph.node if n.name == switch for a in n.attribute}
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in branches["else_branch"].node}
    assert [n.op_type for n in branches["then_branch"].node] == ["QMoE"]
    few, many = x[:QMOE_MAX_TOKENS], np.resize(x, (MOE_BATCH, D))
    np.testing.assert_array_equal(_run(floated, few)[0], _run(q, few)[0])  # the QMoE branch: untouched
    want = _run(dense, many)[0]  # float gather/scatter = the dense float form, with int8-rounded weights
    assert float(np.abs(_run(floated, many)[0] - want).max()) <= 0.05 * float(np.abs(want).max())

    out, record = keep_fast_regions(q, {q.graph.input[0].name: x}, CpuOptions(intra_op_threads=1))
    (moe,) = record["sparse_moe"]
    assert moe["block"] == switch and set(moe["int8_ms"]) == {str(MOE_BATCH)}
    speedup = moe["int8_speedup"][str(MOE_BATCH)]
    assert speedup == round(moe["float_ms"][str(MOE_BATCH)] / moe["int8_ms"][str(MOE_BATCH)], 4)
    assert moe["gather_scatter_branch"] == ("int8" if speedup >= 1.02 else "float")
    assert _ops(out)["QMoE"] == 1 and _ops(out)["If"] == 1 and _ops(out)["TopKGate"] == 1
    np.testing.assert_array_equal(_run(out, many)[1], _run(dense, many)[1])  # route_indices still an output
