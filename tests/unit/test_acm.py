"""Adaptive Computation Modules: the module's forms agree, training modes do what they say, the export keeps
unused learners uncomputed (compaction and If), and calibration is conditional on the learner count."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgegate import nn as enn
from edgegate.calibration import calibrate
from edgegate.calibration.probe import GatedParts, Probe
from edgegate.errors import EdgegateError
from edgegate.gates import GateKind, find_gates, register
from edgegate.onnx_export.passes._graph import graphs
from edgegate.onnx_export.torch_export import ExportOptions, export_onnx
from edgegate.quantization import QuantConfig


def _acm(seed: int = 0, **kw) -> enn.ACM:
    torch.manual_seed(seed)
    return enn.ACM(8, 3, 6, **kw).eval()


def _learner_rows(acm: enn.ACM, x: torch.Tensor) -> list[int]:
    rows = [0] * acm.n_learners
    handles = [m.register_forward_pre_hook(lambda mod, a, i=i: rows.__setitem__(i, rows[i] + a[0].shape[0]))
               for i, m in enumerate(acm.learners)]
    with torch.no_grad():
        acm(x)
    for h in handles:
        h.remove()
    return rows


def test_compaction_is_the_dense_sum_of_the_first_k_learners():
    acm = _acm()
    x = torch.randn(2, 50, 8)
    with torch.no_grad():
        y, k = acm.forward_counted(x)
        dense = acm.forward_dense(x.reshape(-1, 8), k.reshape(-1)).reshape(x.shape)
    assert y.shape == x.shape and k.shape == (2, 50) and k.dtype == torch.int64
    assert set(k.unique().tolist()) == {0, 1, 2, 3}  # every count occurs: the comparison is not vacuous
    torch.testing.assert_close(y, dense, rtol=0, atol=1e-6)
    assert (y.reshape(-1, 8)[k.reshape(-1) == 0] == 0).all()  # k = 0: the residual branch adds nothing
    torch.testing.assert_close(acm.last_decision, k.reshape(-1))
    assert _learner_rows(acm, x) == [int((k > i).sum()) for i in range(3)]  # learner i runs on k > i only


def test_fixed_k_and_coverage_widening():
    acm = _acm()
    x = torch.randn(40, 8)
    with torch.no_grad():
        y, k = acm.forward_counted(x)
        acm.coverage_extra = 1  # calibration only: one more learner per token, at weight 0
        y_wide = acm(x)
        rows = _learner_rows(acm, x)
        acm.coverage_extra, acm.fixed_k = 0, 3
        y_all, k_all = acm.forward_counted(x)
    torch.testing.assert_close(y_wide, y, rtol=0, atol=1e-6)
    assert rows == [int((k + 1 > i).sum()) for i in range(3)] and rows[2] > int((k > 2).sum())
    assert (k_all == 3).all()
    torch.testing.assert_close(y_all, acm.forward_dense(x, k_all))


def test_count_labels_are_the_smallest_k_within_tolerance():
    acm = _acm()
    x = torch.randn(64, 8)
    assert (acm.count_labels(x, 0.0) == 3).all()  # only all learners match themselves exactly
    assert (acm.count_labels(x, 1.0) == 0).all()  # k = 0 has relative error exactly 1
    loose, tight = acm.count_labels(x, 0.5), acm.count_labels(x, 0.05)
    assert (loose <= tight).all() and loose.float().mean() < tight.float().mean()


def test_gumbel_training_trades_accuracy_for_compute():
    torch.manual_seed(0)
    x = torch.randn(256, 8)

    def train(penalty: float) -> float:
        acm = _acm(seed=1)
        acm.train_mode = enn.ACMTraining.GUMBEL
        with torch.no_grad():
            target = acm.forward_dense(x, torch.full((len(x),), 3))
        opt = torch.optim.Adam(acm.gate.parameters(), lr=0.05)
        acm.train()
        for _ in range(60):
            loss = (acm(x) - target).square().mean() + penalty * acm.compute_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        acm.eval()
        with torch.no_grad():
            return float(acm.forward_counted(x)[1].float().mean())

    assert train(0.0) > 2.5 and train(5.0) < 0.5  # the task pulls k up, the compute penalty pushes it down


def test_config_errors_and_registration():
    acm = _acm(gate_hidden=4, act="relu")
    again = enn.ACM(**acm.get_config())
    assert again.get_config() == {"d_model": 8, "n_learners": 3, "d_hidden": 6, "gate_hidden": 4, "act": "relu"}
    with pytest.raises(EdgegateError, match="n_learners >= 1"):
        enn.ACM(8, 0, 4)
    with pytest.raises(EdgegateError, match="act='tanh' is unknown"):
        enn.ACM(8, 2, 4, act="tanh")
    info = find_gates(torch.nn.Sequential(acm)).gates[0]
    assert (info.name, info.kind, info.details) == ("0", GateKind.LEARNERS, {"n_learners": 3, "d_hidden": 6,
                                                                            "gate_hidden": 4})

    class Mine(torch.nn.Module):
        pass

    with pytest.raises(EdgegateError, match="does not subclass edgegate.nn.ACM"):
        register(Mine, "learners")


def _run(proto, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_export_compaction_and_if(zoo_model):
    model, _ = zoo_model("acm")
    x = np.random.default_rng(0).normal(size=(32, 16)).astype(np.float32)
    with torch.no_grad():
        want_logits, want_k = (t.numpy() for t in model(torch.from_numpy(x)))
    assert len(set(want_k.tolist())) >= 3

    compact = export_onnx(model, torch.from_numpy(x), "x")
    ops = [n.op_type for n in compact.graph.node]
    assert ops.count("LearnerCount") == 1 and ops.count("NonZero") == 4 and "If" not in ops
    logits, k = _run(compact, x)
    np.testing.assert_array_equal(k, want_k)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5)

    nested = export_onnx(model, torch.from_numpy(x[:1]), "x", ExportOptions(batch=1))
    all_ops = [n.op_type for g in graphs(nested.graph) for n in g.node]
    assert all_ops.count("If") == 4 and "NonZero" not in all_ops  # learner i+1 only inside "k > i"
    for i in range(8):
        logits, k = _run(nested, x[i:i + 1])
        assert k[0] == want_k[i]
        np.testing.assert_allclose(logits, want_logits[i:i + 1], atol=1e-5)


def test_calibration_sees_each_learner_on_the_tokens_that_use_it(zoo_model):
    model, _ = zoo_model("acm")
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(400, 16)).astype(np.float32))
    parts = GatedParts.of(model, find_gates(model))
    with torch.no_grad(), Probe(model, [], parts, keep_acm_counts=True) as probe:
        model(x)
    k = probe.acm_counts("acm")
    assert probe.learner_rows["acm"] == [int((k > i).sum()) for i in range(4)]
    need = 200  # more than the tokens that use learner 3: calibration widens the counts for it
    assert int((k > 3).sum()) < need

    qmodel, record = calibrate(model, x.numpy(), QuantConfig(min_coverage=need, bias_correction=False))
    (aug,) = [a for a in record.augmentation if a.kind == "learner_count"]
    s = int(aug.after)
    assert aug.gate == "acm" and s >= 1 and aug.rows_after >= need > aug.rows_before
    assert record.coverage.learners["acm"] == [int((k > i).sum()) for i in range(4)]
    assert record.calibrated.learners["acm"] == [int((k + s > i).sum()) for i in range(4)]
    assert record.calibrated.layers["acm.learners.3.0"] == int((k + s > 3).sum())
    assert {"acm.gate.0", "acm.gate.2"} <= set(record.float_layers)  # the gate stays float
    assert qmodel.acm.coverage_extra == 0 and model.acm.coverage_extra == 0  # widening is undone

    _, naive = calibrate(model, x.numpy(), QuantConfig(calibration="naive", bias_correction=False))
    assert naive.calibrated.learners["acm"] == [400] * 4  # gate-unaware: every learner sees every token
