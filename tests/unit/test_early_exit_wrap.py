"""A user's own early-exit network (Python ``if`` on the max softmax in ``forward``), wrapped without
retraining by ``EarlyExitNet.wrap``: same decisions as the user's forward, exported with ``If`` at batch 1
and with compaction otherwise, calibrated gate-aware with exit agreement reported; and the gate
registry refusing labels that have no behaviour behind them.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgegate import nn as enn
from edgegate.calibration import calibrate, measure_fidelity
from edgegate.data import load_data
from edgegate.errors import EdgegateError
from edgegate.gates import GateKind, Observe, family_of, find_gates, register
from edgegate.onnx_export.torch_export import ExportOptions, export_onnx
from edgegate.quantization.config import QuantConfig
from edgegate.quantization.policy import decision_layers
from edgegate.zoo.training import deterministic

THRESHOLDS = [0.9, 0.8]


class UserExitMLP(nn.Module):
    """Written the way people write early exits: a Python branch per sample (batch 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 32), nn.ReLU()),
                                     nn.Sequential(nn.Linear(32, 32), nn.ReLU()),
                                     nn.Sequential(nn.Linear(32, 32), nn.ReLU())])
        self.exits = nn.ModuleList([nn.Linear(32, 4) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        h = x
        for k, (block, head) in enumerate(zip(self.blocks, self.exits, strict=True)):
            h = block(h)
            logits = head(h)
            if k < len(THRESHOLDS) and logits.softmax(-1).max() >= THRESHOLDS[k]:
                return logits, k
        return logits, len(self.blocks) - 1


@pytest.fixture(scope="module")
def user_net() -> tuple[UserExitMLP, dict[str, np.ndarray]]:
    data = load_data("clusters")
    x = torch.from_numpy(data.split("train").input()).float()
    y = torch.from_numpy(data.split("train").labels)
    user = UserExitMLP()
    with deterministic(0):
        opt = torch.optim.Adam(user.parameters(), lr=3e-3)
        for _ in range(150):  # every head learns the task (the user's own training, not edgegate's)
            idx = torch.randint(0, len(x), (128,))
            h, loss = x[idx], 0.0
            for block, head in zip(user.blocks, user.exits, strict=True):
                h = block(h)
                loss = loss + F.cross_entropy(head(h), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    user.eval()
    splits = {s: data.split(s).input().astype(np.float32) for s in ("val", "test")}
    return user, splits


def _wrap(user: UserExitMLP) -> enn.EarlyExitNet:
    return enn.EarlyExitNet.wrap(user.blocks, user.exits, THRESHOLDS).eval()


def test_wrapped_net_decides_like_the_users_forward(user_net):
    user, data = user_net
    net = _wrap(user)
    assert net.stages[0] is user.blocks[0] and net.heads[2] is user.exits[2]  # the user's modules, not copies
    x = torch.from_numpy(data["test"][:200])
    with torch.no_grad():
        logits, exit_index = net(x)
        one_by_one = [user(x[i:i + 1]) for i in range(len(x))]
    assert exit_index.tolist() == [k for _, k in one_by_one]
    torch.testing.assert_close(logits, torch.cat([lg for lg, _ in one_by_one]))
    assert len(set(exit_index.tolist())) == 3  # every exit is taken by some samples
    (gate,) = find_gates(net)
    assert gate.kind == GateKind.EXIT and gate.details["thresholds"] == pytest.approx(THRESHOLDS)


def test_wrapped_net_exports_with_if_at_batch_1_and_compaction_otherwise(user_net):
    user, data = user_net
    net = _wrap(user)
    x = data["test"][:64]
    with torch.no_grad():
        want_logits, want_exit = (t.numpy() for t in net(torch.from_numpy(x)))
    batch1 = export_onnx(net, torch.from_numpy(x[:1]), "x", ExportOptions(batch=1))
    assert sum(n.op_type == "If" for n in batch1.graph.node) == 1  # nested: stage 1's If holds stage 2's
    assert "ExitDecision" in {f.name for f in batch1.functions}
    session = ort.InferenceSession(batch1.SerializeToString(), providers=["CPUExecutionProvider"])
    for i in range(16):
        logits, exit_index = session.run(None, {"x": x[i:i + 1]})
        np.testing.assert_allclose(logits, want_logits[i:i + 1], atol=1e-5)
        assert int(exit_index[0]) == int(want_exit[i])
    batched = export_onnx(net, torch.from_numpy(x), "x", ExportOptions(batch=len(x)))
    assert not any(n.op_type == "If" for n in batched.graph.node)
    assert any(n.op_type == "NonZero" for n in batched.graph.node)  # exited samples are dropped
    logits, exit_index = ort.InferenceSession(batched.SerializeToString(),
                                              providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(logits, want_logits, atol=1e-5)
    np.testing.assert_array_equal(exit_index, want_exit)


def test_wrapped_net_calibrates_gate_aware_and_reports_exit_agreement(user_net):
    user, data = user_net
    net = _wrap(user)
    assert set(decision_layers(net, find_gates(net))) == {"heads.0", "heads.1", "heads.2"}
    with deterministic(0):
        # One calibration as configured (threshold re-tuning on): the fidelity search has its own tests.
        qnet, record = calibrate(net, data["val"], QuantConfig(fidelity_target=0))
        fidelity = measure_fidelity(net, qnet, data["test"])
    assert record.thresholds[""]["before"] == pytest.approx(THRESHOLDS)
    assert record.calibrated.stages[""][0] == len(data["val"])  # every sample reaches stage 0
    assert 0 < record.calibrated.stages[""][2] < len(data["val"])  # ... and only some the last stage
    assert fidelity["gates"][""]["kind"] == "exit"
    assert fidelity["summary"]["exit_agreement"] >= 0.95


def test_wrap_refuses_what_it_cannot_serve_and_saving_says_how():
    blocks, heads = [nn.Linear(4, 4), nn.Linear(4, 4)], [nn.Linear(4, 2), nn.Linear(4, 2)]
    with pytest.raises(EdgegateError, match=r"heads\[1\] is a builtin_function_or_method, not an nn.Module"):
        enn.EarlyExitNet.wrap(blocks, [heads[0], torch.relu], [0.9])
    with pytest.raises(EdgegateError, match="needs 1 thresholds"):
        enn.EarlyExitNet.wrap(blocks, heads, [0.9, 0.9])
    with pytest.raises(EdgegateError, match="policy='learned' needs the trained exit_gates"):
        enn.EarlyExitNet.wrap(blocks, heads, [0.5], policy="learned")
    learned = enn.EarlyExitNet.wrap(blocks, heads, [0.5], policy="learned", exit_gates=[enn.exit_gate_mlp()])
    assert learned.policy == "learned" and len(learned.exit_gates) == 1
    with pytest.raises(EdgegateError, match=r"torch.save\(net, path\) and export that file with --trust-model"):
        learned.get_config()


def test_register_refuses_labels_without_behaviour():
    class MyExits(nn.Module):
        pass

    with pytest.raises(EdgegateError, match=r"^register: .*MyExits does not subclass edgegate.nn.EarlyExitNet, "
                                            r"which exit gates need .*EarlyExitNet.wrap\(stages, heads, thresholds, "
                                            r"policy\)"):
        register(MyExits, "exit")
    with pytest.raises(EdgegateError, match="does not subclass edgegate.nn.TopKRouter, which router gates need"):
        register(MyExits, GateKind.ROUTER)
    assert family_of(MyExits()) is None

    class MyExitNet(enn.EarlyExitNet):  # a subclass has the protocol: it is an exit gate already
        pass

    assert register(MyExitNet, "exit") is MyExitNet
    assert family_of(MyExitNet([nn.Identity()], [nn.Identity()], [])).observe is Observe.EXITS

    class Mask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scorer = nn.Linear(4, 4)

        def forward(self, x):
            return x * (self.scorer(x) > 0)  # records no last_decision

    register(Mask, "channel", decision_layers=lambda m, info, model: [(m.scorer, "my mask scorer")])
    model = nn.Sequential(Mask())
    family = family_of(model[0])
    assert (family.kind, family.observe) == (GateKind.CHANNEL, Observe.DECISION)
    assert decision_layers(model, find_gates(model)) == {"0.scorer": "my mask scorer"}
    # Observed only through last_decision: a gate that records none is reported as unmeasured.
    fidelity = measure_fidelity(model, model, np.ones((4, 4), np.float32))
    assert fidelity["gates"] == {"0": {"kind": "channel", "observed": False}} and fidelity["summary"] == {}
