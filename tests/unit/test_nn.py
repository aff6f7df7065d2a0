"""edgegate.nn modules (shapes, hard mode == op semantics, last_decision, get_config, gradients) and
edgegate.gates (find_gates / registry)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgegate import nn as enn
from edgegate.errors import EdgegateError
from edgegate.gates import GateKind, GateMap, find_gates, register
from edgegate.ops import reference, unpack_ternary
from edgegate.ops import torch_ops as ops


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _rebuilt(m: nn.Module) -> nn.Module:
    """``type(m)(**get_config())`` through JSON, with m's weights: the checkpoint round trip."""
    config = json.loads(json.dumps(m.get_config()))
    clone = type(m)(**config)
    clone.load_state_dict(m.state_dict())
    return clone.train(m.training)


def _grads_flow(m: nn.Module, out: torch.Tensor, names: list[str]) -> None:
    out.float().square().sum().backward()
    params = dict(m.named_parameters())
    for name in names:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("mode,gate_shape", [("headwise", (2, 4, 5, 1)), ("elementwise", (2, 4, 5, 4))])
def test_gated_attention_hard_mode_matches_sigmoid_gate_semantics(mode, gate_shape):
    torch.manual_seed(0)
    m = enn.GatedAttention(16, 4, gate=mode).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        y = m(x)
        q, k, v = (p(x).reshape(2, 5, 4, 4).transpose(1, 2) for p in (m.q_proj, m.k_proj, m.v_proj))
        attn = F.scaled_dot_product_attention(q, k, v)
        g = m.gate_proj(x).reshape(2, 5, 4, -1).transpose(1, 2)
        gated = reference("SigmoidGate", _np(attn), _np(g))
        expect = m.o_proj(torch.from_numpy(gated).transpose(1, 2).reshape(2, 5, 16))
    assert y.shape == (2, 5, 16)
    np.testing.assert_allclose(_np(y), _np(expect), atol=1e-5)
    assert m.last_decision.shape == gate_shape
    np.testing.assert_allclose(_np(m.last_decision), _np(torch.sigmoid(g)), atol=1e-6)


def test_gated_attention_trains_and_rebuilds():
    torch.manual_seed(0)
    m = enn.GatedAttention(8, 2, gate="elementwise").train()
    _grads_flow(m, m(torch.randn(3, 4, 8)), ["gate_proj.weight", "q_proj.weight"])
    assert m.last_decision is None  # recorded by eval forwards only
    x = torch.randn(3, 4, 8)
    m.eval()
    torch.testing.assert_close(_rebuilt(m)(x), m(x))


def test_gated_attention_rejects_bad_config():
    with pytest.raises(EdgegateError, match="divisible"):
        enn.GatedAttention(10, 3)
    with pytest.raises(EdgegateError, match="gate="):
        enn.GatedAttention(8, 2, gate="rowwise")


# ----------------------------------------------------------------------------------- threshold gate


def test_threshold_gate_hard_mode_is_the_op():
    torch.manual_seed(0)
    m = enn.ThresholdGate(6)
    with torch.no_grad():
        m.tau.copy_(torch.linspace(-0.5, 0.5, 6))
        m.gain.copy_(torch.linspace(0.5, 1.5, 6))
    h = torch.randn(4, 6)
    with torch.no_grad():
        y = m.eval()(h)
    np.testing.assert_allclose(_np(y), reference("ThresholdGate", _np(h), _np(m.tau), _np(m.gain)))
    assert m.last_decision.dtype == torch.bool and m.last_decision.shape == (4, 6)
    assert torch.equal(m.last_decision, h > m.tau)
    assert (y[~m.last_decision] == 0).all()


def test_threshold_gate_training_is_smooth_and_tends_to_hard():
    torch.manual_seed(0)
    m = enn.ThresholdGate(5, temperature=0.5).train()
    h = torch.randn(8, 5)
    _grads_flow(m, m(h), ["tau", "gain"])
    m.temperature = 1e-4
    hard = reference("ThresholdGate", _np(h), _np(m.tau), _np(m.gain))
    np.testing.assert_allclose(_np(m(h)), hard, atol=1e-4)
    assert _rebuilt(m).get_config() == {"features": 5, "temperature": 0.5, "init_tau": 0.0}


# ------------------------------------------------------------------------------------- channel gate


@pytest.mark.parametrize("y_shape", [(3, 6, 4, 4), (3, 6)])
def test_channel_gate_hard_mode_is_the_op(y_shape):
    torch.manual_seed(0)
    m = enn.ChannelGate(5, 6, init_open=0.0).eval()
    x = torch.randn(3, 5, 4, 4) if len(y_shape) == 4 else torch.randn(3, 5)
    y = torch.randn(*y_shape)
    with torch.no_grad():
        out = m(x, y)
        logits = m.mask_logits(x).reshape(3, 6, *([1] * (len(y_shape) - 2)))
    np.testing.assert_allclose(_np(out), reference("ChannelGate", _np(y), _np(logits)))
    mask = m.last_decision
    assert mask.dtype == torch.bool and mask.shape == (3, 6)
    assert 0 < mask.sum() < mask.numel()  # a random predictor keeps some channels and drops others
    assert (out[~mask] == 0).all()


def test_channel_gate_training_uses_a_straight_through_mask():
    torch.manual_seed(0)
    m = enn.ChannelGate(4, 6, init_open=0.0).train()
    x, y = torch.randn(5, 4, 3, 3), torch.randn(5, 6, 3, 3)
    out = m(x, y)
    with torch.no_grad():
        hard = reference("ChannelGate", _np(y), _np(m.mask_logits(x).reshape(5, 6, 1, 1)))
    np.testing.assert_allclose(_np(out), hard, atol=1e-6)  # forward is the hard mask
    assert m.sparsity_loss is not None and m.sparsity_loss.requires_grad
    (out.square().sum() + m.sparsity_loss).backward()
    assert m.predictor.weight.grad.abs().sum() > 0
    assert _rebuilt(m).get_config() == {"in_channels": 4, "out_channels": 6, "init_open": 0.0}


# ---------------------------------------------------------------------------------------------- MoE


def test_router_is_topk_gate_with_load_and_aux_loss():
    torch.manual_seed(0)
    r = enn.TopKRouter(8, 5, 2).eval()
    x = torch.randn(32, 8)
    with torch.no_grad():
        w, idx = r(x)
    ref_w, ref_idx = reference("TopKGate", _np(r.proj(x)), np.zeros(5, np.float32), k=2)
    np.testing.assert_allclose(_np(w), ref_w, atol=1e-6)
    assert idx.dtype == torch.int64 and np.array_equal(_np(idx), ref_idx)
    torch.testing.assert_close(w.sum(-1), torch.ones(32))
    assert torch.equal(r.last_decision, idx)
    assert r.last_load.shape == (5,) and float(r.last_load.sum()) == pytest.approx(1.0)
    r.train()
    r(x)
    assert r.aux_loss.requires_grad and float(r.aux_loss.detach()) > 0
    with pytest.raises(EdgegateError, match="k=6"):
        enn.TopKRouter(8, 5, 6)


def _moe_by_hand(m: enn.MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, slot by slot: the MoE++ semantics the dense formulation must reproduce."""
    w, idx = ops.topk_gate(m.router.proj(x), m.k)
    kinds = m.slot_kinds()
    out = torch.zeros_like(x)
    for t in range(len(x)):
        for j in range(m.k):
            s = int(idx[t, j])
            if kinds[s] == "ffn":
                e = m.experts[s]
                y = e.w2(F.silu(e.w1(x[t])) * e.w3(x[t]))
            elif kinds[s] == "zero":
                y = torch.zeros_like(x[t])
            elif kinds[s] == "copy":
                y = x[t]
            else:
                c = s - m.n_experts - m.n_zero - m.n_copy
                a = torch.softmax(m.const_mix(x[t]).reshape(m.n_const, 2)[c], -1)
                y = a[0] * x[t] + a[1] * m.const_vectors[c]
            out[t] += w[t, j] * y
    return out


def test_moe_pp_dense_formulation_equals_per_token_routing():
    torch.manual_seed(0)
    m = enn.MoE(8, 16, n_experts=3, k=2, n_zero=1, n_copy=1, n_const=2).eval()
    with torch.no_grad():
        m.router.proj.weight.mul_(5)  # spread routing over every slot kind
        x = torch.randn(64, 8)
        y = m(x)
        expect = _moe_by_hand(m, x)
    torch.testing.assert_close(y, expect, atol=1e-5, rtol=1e-5)
    assert m.last_decision.shape == (64, 2)
    kinds_used = {m.slot_kinds()[int(s)] for s in m.last_decision.flatten()}
    assert kinds_used == {"ffn", "zero", "copy", "const"}
    ffn = (m.last_decision < 3).sum(1).float().mean()
    assert m.last_ffn_per_token == pytest.approx(float(ffn))
    assert m.last_load.shape == (m.n_slots,)


def test_moe_keeps_leading_dims_trains_and_rebuilds():
    torch.manual_seed(0)
    m = enn.MoE(8, 16, n_experts=4, k=2, n_const=1).train()
    x = torch.randn(2, 5, 8)
    y = m(x)
    assert y.shape == x.shape
    (y.square().sum() + m.aux_loss).backward()
    assert m.router.proj.weight.grad.abs().sum() > 0 and m.const_vectors.grad.abs().sum() > 0
    m.eval()
    torch.testing.assert_close(_rebuilt(m)(x), m(x))


# --------------------------------------------------------------------------------------- early exit


def _exit_net(policy: str = "maxprob", thresholds=(0.5, 0.6)) -> enn.ExitMLP:
    torch.manual_seed(0)
    return enn.ExitMLP(6, hidden=[8, 8, 8], n_classes=3, n_stages=3, policy=policy, thresholds=thresholds)


def _exit_by_hand(net: enn.EarlyExitNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    heads = net.forward_all(x)
    exit_at = torch.full((len(x),), net.n_exits - 1)
    for k in reversed(range(net.n_exits - 1)):
        exit_at = torch.where(net.decide(k, heads[k]), k, exit_at)
    return torch.stack(heads)[exit_at, torch.arange(len(x))], exit_at


@pytest.mark.parametrize("policy", ["maxprob", "learned"])
def test_early_exit_compaction_matches_per_sample_exits(policy):
    net = _exit_net(policy, thresholds=(0.45, 0.5)).eval()
    x = torch.randn(200, 6) * 3
    with torch.no_grad():
        if policy == "learned":  # untrained gates sit near 0.5: put each threshold at its gate's median
            heads = net.forward_all(x)
            net.set_thresholds([torch.sigmoid(net.gate_logit(k, heads[k])).median() for k in range(2)])
        logits, exit_index = net(x)
        expect, exit_at = _exit_by_hand(net, x)
    assert logits.shape == (200, 3) and exit_index.dtype == torch.int64
    assert torch.equal(exit_index, exit_at)
    torch.testing.assert_close(logits, expect)
    assert len(torch.unique(exit_index)) >= 2  # the test exercises compaction, not one branch
    assert torch.equal(net.last_decision, exit_index)


def test_early_exit_decide_uses_the_exit_ops():
    net = _exit_net().eval()
    logits = torch.randn(50, 3) * 2
    with torch.no_grad():
        dec = net.decide(0, logits)
    assert np.array_equal(_np(dec), reference("ExitDecision", _np(logits), np.float32(0.5)))
    feats = net.exit_features(logits)
    p = torch.softmax(logits, -1)
    assert feats.shape == (50, 3)
    torch.testing.assert_close(feats[:, 0], p.max(-1).values)
    assert (feats[:, 2] >= 0).all() and (feats[:, 1] >= 0).all()

    learned = _exit_net("learned").eval()
    with torch.no_grad():
        gate = learned.gate_logit(1, logits)
        dec = learned.decide(1, logits)
    assert np.array_equal(_np(dec), reference("LearnedExitDecision", _np(gate), np.float32(0.6)))


def test_early_exit_extremes_training_and_config():
    net = _exit_net(thresholds=(0.0, 0.0)).eval()
    x = torch.randn(10, 6)
    assert (net(x)[1] == 0).all()
    net.set_thresholds([1.1, 1.1])
    assert (net(x)[1] == 2).all()
    assert _rebuilt(net).get_config()["thresholds"] == pytest.approx([1.1, 1.1])
    net.train()
    outs = net(x)
    assert isinstance(outs, list) and len(outs) == 3
    sum(o.square().sum() for o in outs).backward()
    assert net.stages[0][0].weight.grad.abs().sum() > 0
    plain = enn.EarlyExitNet([nn.Identity(), nn.Identity()], [nn.Linear(6, 3), nn.Linear(6, 3)], [0.5])
    with pytest.raises(EdgegateError, match="no JSON config"):
        plain.get_config()
    with pytest.raises(EdgegateError, match="thresholds"):
        enn.EarlyExitNet([nn.Identity(), nn.Identity()], [nn.Linear(6, 3), nn.Linear(6, 3)], [0.5, 0.5])


def test_early_exit_compaction_exports_with_dynamic_batch():
    net = _exit_net(thresholds=(0.45, 0.5)).eval()
    x = torch.randn(16, 6) * 3
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(net, (x,), dynamic_shapes=({0: batch},), strict=False)
    x2 = torch.randn(77, 6) * 3
    with torch.no_grad():
        got, want = ep.module()(x2), net(x2)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])


# ------------------------------------------------------------------------------------------ ternary


def test_ternarize_and_activation_quantization():
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    codes, gamma = enn.ternarize(w)
    assert set(codes.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert float(gamma) == pytest.approx(float(w.abs().mean()))
    x = torch.randn(3, 10)
    xq = enn.quantize_activations(x)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((xq - x).abs() <= step / 2 + 1e-7).all()
    torch.testing.assert_close(xq.abs().amax(-1), x.abs().amax(-1))  # the absmax value is exact


def test_ternary_linear_eval_is_ternary_matmul_on_packed_weights():
    torch.manual_seed(0)
    m = enn.TernaryLinear(10, 6, bias=True)
    with torch.no_grad():
        m.bias.uniform_(-1, 1)
    m.eval()
    x = torch.randn(4, 10)
    with torch.no_grad():
        y = m(x)
    # BitNet: one absmean scale per tensor
    packed, scale = m.ternary_weights()
    assert packed.dtype == torch.uint8 and packed.shape == (6, 3) and scale.shape == ()
    codes, gamma = enn.ternarize(m.weight.detach())
    np.testing.assert_array_equal(unpack_ternary(_np(packed), 10), _np(codes).astype(np.int8))
    xq = _np(enn.quantize_activations(x))
    expect = reference("TernaryMatMul", xq, _np(packed), _np(scale), in_features=10) + _np(m.bias)
    np.testing.assert_allclose(_np(y), expect, atol=1e-5)
    torch.testing.assert_close(y, F.linear(torch.from_numpy(xq), codes * gamma, m.bias))


def test_ternary_cache_follows_the_weights():
    torch.manual_seed(0)
    m = enn.TernaryLinear(8, 4).eval()
    assert m._packed is not None  # eval() packs the weights
    first = m.ternary_weights()[0].clone()
    m.load_state_dict({"weight": -m.weight.detach()})
    assert m._packed is None
    assert torch.equal(torch.from_numpy(unpack_ternary(_np(m.ternary_weights()[0]), 8)),
                       -torch.from_numpy(unpack_ternary(_np(first), 8)))
    with torch.no_grad():
        m.weight.mul_(-1)  # in-place edits bump the version counter
    assert torch.equal(m.ternary_weights()[0], first)
    m.train()
    assert m._packed is None


def test_ternary_training_uses_straight_through_estimators():
    torch.manual_seed(0)
    m = enn.TernaryLinear(8, 4).train()
    x = torch.randn(5, 8, requires_grad=True)
    y = m(x)
    codes, gamma = enn.ternarize(m.weight.detach())
    torch.testing.assert_close(y, F.linear(enn.quantize_activations(x.detach()), codes * gamma))
    y.sum().backward()
    assert m.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_ternary_export_captures_packed_constants():
    m = enn.TernaryLinear(12, 5).eval()
    ep = torch.export.export(m, (torch.randn(2, 12),), strict=False)
    consts = list(ep.constants.values())
    assert any(c.dtype == torch.uint8 and c.shape == (5, 3) for c in consts)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "edgegate.ternary_matmul.default" in targets


def test_hgf_linear_adds_a_gated_low_rank_correction():
    torch.manual_seed(0)
    m = enn.HGFLinear(10, 6, rank=3).eval()
    x = torch.randn(4, 10)
    plain = enn.TernaryLinear(10, 6).eval()
    plain.load_state_dict({"weight": m.weight.detach()})
    with torch.no_grad():
        torch.testing.assert_close(m(x), plain(x))  # B starts at zero: pure ternary
        m.lr_b.normal_()
        m.g.fill_(0.3)
        y = m(x)
    corr = reference("LowRankCorrection", _np(x), _np(m.lr_a), _np(m.lr_b), np.float32(0.3))
    np.testing.assert_allclose(_np(y), _np(plain(x)) + corr, atol=1e-5)
    assert float(m.last_decision) == pytest.approx(0.3)
    assert _rebuilt(m).get_config() == {"in_features": 10, "out_features": 6, "bias": False, "rank": 3,
                                        "gate_init": 1.0}
    m.train()
    _grads_flow(m, m(x), ["lr_a", "lr_b", "g", "weight"])


# ------------------------------------------------------------------------------------------- gates


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = enn.GatedAttention(8, 2)
        self.moe = enn.MoE(8, 16, 4, 2, n_zero=1)
        self.fc = enn.HGFLinear(8, 8, 2)
        self.tern = enn.TernaryLinear(8, 8)
        self.plain = nn.Linear(8, 8)


def test_find_gates_lists_each_family_with_details():
    gm = find_gates(_Net())
    assert [(g.name, g.kind) for g in gm] == [("attn", GateKind.SIGMOID), ("moe.router", GateKind.ROUTER),
                                              ("fc", GateKind.LOWRANK), ("tern", GateKind.TERNARY)]
    router = gm["moe.router"]
    assert router.details["k"] == 2 and router.details["n_experts"] == 5
    assert router.details["slot_kinds"] == ["ffn"] * 4 + ["zero"]
    assert gm.by_kind("lowrank")[0].details["rank"] == 2
    assert GateMap.from_dict(json.loads(json.dumps(gm.to_dict()))) == gm
    net = _exit_net()
    (g,) = find_gates(net)
    assert g.name == "" and g.kind == GateKind.EXIT and g.details["thresholds"] == pytest.approx([0.5, 0.6])


def test_register_user_gates():
    class MyGate(nn.Module):
        def gate_details(self) -> dict:
            return {"why": "custom"}

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.g = MyGate()

    assert len(find_gates(Holder())) == 0
    register(MyGate, "sigmoid")
    register(MyGate, GateKind.SIGMOID)  # same kind again: fine
    (g,) = find_gates(Holder())
    assert (g.name, g.kind, g.module, g.details) == ("g", GateKind.SIGMOID, "MyGate", {"why": "custom"})
    with pytest.raises(EdgegateError, match="already registered as a sigmoid gate"):
        register(MyGate, GateKind.CHANNEL)
    with pytest.raises(EdgegateError, match="already registered"):
        register(enn.TopKRouter, "exit")
    with pytest.raises(EdgegateError, match="unknown gate kind"):
        register(MyGate, "bogus")
