"""Gate-aware calibration on the zoo: fidelity, path-conditional statistics, coverage, re-tuning, bad data.

Calibration uses each zoo model's ``val`` split, fidelity its ``test`` split (unless a test says why not).
Tests of the mechanics (rows per layer, re-tuning, coverage) calibrate once (``ONCE``: no fidelity search,
which may move layers to A16W8 or float); the fidelity search itself is tested in test_fidelity_search.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from edgegate import zoo
from edgegate.calibration import calibrate, comparable_metrics, measure_fidelity
from edgegate.calibration.collect import finish, finished_state, observe, restore_state
from edgegate.calibration.probe import exit_score
from edgegate.errors import DataError
from edgegate.gates import find_gates
from edgegate.nn import ExitMLP, MoE
from edgegate.quantization import QuantConfig
from edgegate.quantization.layers import quant_layer

DIGITS = ["channel_gate", "gated_attention", "moe", "moe_pp", "threshold_gate"]
ONCE = {"fidelity_target": 0}  # one calibration as configured


@pytest.fixture(scope="module")
def calibrated(zoo_model):
    """``calibrated(name, **config) -> (float model, quantized model, record, dataset)``, cached."""
    cache: dict = {}

    def get(name: str, **config):
        key = (name, tuple(sorted(config.items())))
        if key not in cache:
            model, _ = zoo_model(name)
            data = zoo.entry(name).load_data()
            qmodel, record = calibrate(model, data.split("val").input(), QuantConfig(**config))
            cache[key] = (model, qmodel, record, data)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def fidelity(calibrated):
    cache: dict = {}

    def get(name: str, split: str = "test", **config):
        key = (name, split, tuple(sorted(config.items())))
        if key not in cache:
            model, qmodel, _, data = calibrated(name, **config)
            part = data.split(split) if split != "held_out" else data.subset(
                np.concatenate([data.splits["train"], data.splits["test"]]))
            cache[key] = measure_fidelity(model, qmodel, part.input(), part.labels)
        return cache[key]

    return get


def _default_scale(config: QuantConfig) -> float:
    return float(quant_layer(nn.Linear(2, 2), config).input_quant.scale())


# ------------------------------------------------------------------------------------- fidelity targets


@pytest.mark.parametrize("name", [*DIGITS, "early_exit"])
def test_int8_accuracy_within_half_a_point_of_float(name, fidelity):
    acc = fidelity(name)["accuracy"]
    assert acc["float"] - acc["quant"] <= 0.005, acc  # a drop; int8 may also land a sample higher


def test_gate_decisions_survive_int8(fidelity):
    """The default fidelity target (0.995) holds on every non-calibration row (train + test: 1 527 digits,
    3 400 clusters samples), not only on the calibration rows the search judged."""
    for name in ("moe", "moe_pp"):
        s = fidelity(name, "held_out")["summary"]
        assert s["topk_set_agreement"] >= 0.995 and s["top1_expert_agreement"] >= 0.995, (name, s)
    assert fidelity("channel_gate", "held_out")["summary"]["mask_hamming"] <= 0.005
    assert fidelity("threshold_gate", "held_out")["summary"]["mask_hamming"] <= 0.005
    assert fidelity("gated_attention", "held_out")["summary"]["gate_mae"] <= 0.005
    # 8-bit everywhere gives 0.988 on these rows: the int8 input of stage 0 moves the exit-0 score, and many
    # samples lie near tau_0; the search keeps the layers in front of the exits at higher precision.
    assert fidelity("early_exit", "held_out")["summary"]["exit_agreement"] >= 0.995
    assert fidelity("early_exit", "held_out", **ONCE)["summary"]["exit_agreement"] < 0.995


@pytest.mark.parametrize("name", ["early_exit", "moe", "moe_pp"])
def test_gate_aware_at_least_as_faithful_as_naive(name, fidelity):
    """Every non-calibration sample (train + test: 2 400 early-exit samples, 1 527 MoE tokens): gate
    decisions, predictions, accuracy and output SQNR no worse than the naive baseline, strictly better
    on at least one. Loss is reported, not asserted: these are classifiers, whose metric is accuracy
    (the MoE losses differ by < 6e-4 nats, the naive one lower)."""
    ga, naive = fidelity(name, "held_out"), fidelity(name, "held_out", calibration="naive")
    a, b = comparable_metrics(ga), comparable_metrics(naive)
    metrics = ("exit_agreement", "topk_set_agreement", "top1_expert_agreement", "top1_agreement", "accuracy",
               "output_sqnr_db")
    for metric in metrics:
        if metric in a:
            assert a[metric] >= b[metric], (metric, a[metric], b[metric])
    assert [m for m in metrics if m in a and a[m] > b[m]], (a, b)


@pytest.mark.parametrize("name", ["moe", "moe_pp"])
def test_float_router_keeps_more_top_k_sets_than_naive(name, fidelity):
    """The systematic gain, measured on every non-calibration sample (train + test: 1527 tokens) so that
    it is not a one-token effect: an int8 router flips more top-k sets than the float one."""
    ga, naive = fidelity(name, "held_out"), fidelity(name, "held_out", calibration="naive")
    assert ga["summary"]["topk_set_agreement"] > naive["summary"]["topk_set_agreement"]
    assert ga["summary"]["top1_expert_agreement"] >= naive["summary"]["top1_expert_agreement"]
    assert ga["output_sqnr_db"] > naive["output_sqnr_db"]


# ------------------------------------------------------------------------------ path-conditional stats


def test_early_exit_stages_see_exactly_the_samples_that_did_not_exit(calibrated):
    model, qmodel, record, data = calibrated("early_exit", **ONCE)
    x = torch.from_numpy(data.split("val").input())
    with torch.no_grad():
        _, exit_index = model(x)
    reach = [len(x), int((exit_index >= 1).sum()), int((exit_index >= 2).sum())]
    assert reach[2] < reach[1] < reach[0]  # the test means something: samples do exit
    assert [record.calibrated.layers[f"stages.{k}.0"] for k in range(3)] == reach
    assert record.coverage.stages[""] == reach == record.calibrated.stages[""]
    assert record.augmentation == () and record.fallbacks == ()
    assert set(record.plan.float_layers) == {"heads.0", "heads.1", "heads.2"}


@pytest.mark.parametrize("name", ["moe", "moe_pp"])
def test_each_expert_sees_exactly_its_routed_tokens(name, calibrated):
    # gate_precision=int8 also quantizes MoE++'s const_mix: it must see the tokens routed to a const slot.
    model, qmodel, record, data = calibrated(name, gate_precision="int8", **ONCE)
    x = torch.from_numpy(data.split("val").input())
    with torch.no_grad():
        model(x)
    moe: MoE = model.moe
    indices = moe.router.last_decision
    for e in range(moe.n_experts):
        routed = int((indices == e).sum())
        assert 0 < routed < len(x)
        for layer in ("w1", "w3", "w2"):
            assert record.calibrated.layers[f"moe.experts.{e}.{layer}"] == routed
    assert record.calibrated.slots["moe"] == torch.bincount(indices.flatten(), minlength=moe.n_slots).tolist()
    assert record.calibrated.layers["embed"] == record.calibrated.layers["head"] == len(x)
    if moe.n_const:
        first = moe.n_experts + moe.n_zero + moe.n_copy
        assert record.calibrated.layers["moe.const_mix"] == int((indices >= first).any(1).sum())


@pytest.mark.parametrize(("name", "gate_layers"), [("early_exit", {"heads.0", "heads.1", "heads.2"}),
                                                   ("moe_pp", {"moe.router.proj", "moe.const_mix"})])
def test_naive_baseline_feeds_every_quantizer_all_data(name, gate_layers, calibrated):
    _, _, record, data = calibrated(name, calibration="naive")
    n = len(data.split("val").input())
    assert set(record.calibrated.layers.values()) == {n}  # no exit, dense experts
    assert gate_layers <= set(record.plan.layers) and record.plan.float_layers == ()  # gates quantized too
    assert record.thresholds == {} and record.augmentation == ()


def test_retuned_thresholds_reproduce_the_float_exit_profile(calibrated):
    model, qmodel, record, data = calibrated("early_exit", **ONCE)
    x = torch.from_numpy(data.split("val").input())
    with torch.no_grad():
        _, f_exit = model(x)
        _, q_exit = qmodel(x)
    assert np.array_equal(torch.bincount(q_exit, minlength=3).numpy(), torch.bincount(f_exit, minlength=3).numpy())
    t = record.thresholds[""]
    assert t["before"] == [float(v) for v in model.thresholds]  # the float model itself is untouched
    assert t["after"] == [float(v) for v in qmodel.thresholds]


def test_free_tries_finish_one_model_in_place_and_restore_it(zoo_model):
    """The search finishes one observation three ways in place (no copy of the model per try): `finished_state`
    / `restore_state` save and put back all that `finish` changes; the float model serves as the reference
    uncopied and is left as it was."""
    model, _ = zoo_model("early_exit")
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    x = zoo.entry("early_exit").load_data().split("val").input()
    config = QuantConfig(**ONCE)
    observed = observe(model, x, config, find_gates(model), None)
    assert observed.ref is model
    fresh = finished_state(observed)
    assert sorted(fresh) == [("", "thresholds"), *[(f"stages.{i}.0", "bias") for i in range(3)]]  # heads: float
    copied, copied_record = finish(observed, config, copy_model=True)
    assert all(torch.equal(v, finished_state(observed)[k]) for k, v in fresh.items())  # a copy: untouched
    qmodel, record = finish(observed, config)
    assert qmodel is observed.qmodel
    done = finished_state(observed)
    # In place it ends as the copy did: biases corrected, thresholds re-tuned.
    assert all(torch.equal(v, getattr(copied.get_submodule(p), a)) for (p, a), v in done.items())
    assert record.thresholds == copied_record.thresholds and record.bias_corrections == copied_record.bias_corrections
    assert not torch.equal(done["", "thresholds"], fresh["", "thresholds"])
    assert sum(not torch.equal(done[k], fresh[k]) for k in fresh) >= 2
    restore_state(observed, fresh)
    assert all(torch.equal(v, fresh[k]) for k, v in finished_state(observed).items())
    assert all(torch.equal(v, float_state[k]) for k, v in model.state_dict().items())


def test_exit_score_is_what_decide_compares():
    torch.manual_seed(0)
    for policy in ("maxprob", "learned"):
        net = ExitMLP(8, 8, 4, n_stages=2, policy=policy, thresholds=[0.6]).eval()
        logits = torch.randn(64, 4) * 3
        assert torch.equal(net.decide(0, logits), exit_score(net, 0, logits) >= net.thresholds[0])


# ---------------------------------------------------------------------------------- MoE sparse dispatch


def test_sparse_dispatch_equals_dense_and_runs_experts_on_routed_tokens_only(zoo_model):
    torch.manual_seed(0)
    random_moe = MoE(8, 16, n_experts=3, k=2, n_zero=1, n_copy=1, n_const=2).eval()
    with torch.no_grad():
        random_moe.router.proj.weight.mul_(5)  # spread routing over every slot kind
    trained, _ = zoo_model("moe_pp")
    cases = [(random_moe, torch.randn(200, 8)),
             (trained.moe, torch.randn(100, 32))]
    for moe, x in cases:
        calls = {e: 0 for e in range(moe.n_experts)}
        hooks = [ex.register_forward_pre_hook(lambda m, a, e=e, c=calls: c.__setitem__(e, c[e] + len(a[0])))
                 for e, ex in enumerate(moe.experts)]
        with torch.no_grad():
            sparse = moe(x)
            routed = moe.last_decision
            moe.dispatch = "dense"
            dense = moe(x)
            moe.dispatch = "sparse"
        for h in hooks:
            h.remove()
        torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-6)
        # sparse: each expert saw its routed tokens; dense: every token
        assert {e: c - len(x) for e, c in calls.items()} == {e: int((routed == e).sum()) for e in calls}
    # The training path stays dense (static shapes), with the same output.
    random_moe.train()
    x = torch.randn(50, 8)
    dense_train = random_moe(x)
    random_moe.eval()
    torch.testing.assert_close(dense_train.detach(), random_moe(x).detach(), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ coverage and fallbacks


def test_tiny_calibration_set_gets_augmented_coverage(zoo_model):
    config = QuantConfig(**ONCE)  # min_coverage=32 > 20 samples: every path must see all 20
    default = _default_scale(config)
    model, _ = zoo_model("early_exit")
    x = zoo.entry("early_exit").load_data().split("val").input()[:20]
    original = [float(t) for t in model.thresholds]
    qmodel, record = calibrate(model, x, config)
    exits = [a for a in record.augmentation if a.kind == "exit_threshold"]
    assert [a.index for a in exits] == [0, 1]
    assert all(a.after > a.before and a.rows_before < 20 == a.rows_after for a in exits)
    assert [record.calibrated.layers[f"stages.{k}.0"] for k in range(3)] == [20, 20, 20]
    assert record.coverage.stages[""][2] < 20  # deployed gating alone would have starved stage 2
    assert all(abs(q.act_scale - default) > 1e-6 for q in record.plan.layers.values())
    # Augmentation is calibration-only: thresholds restored before re-tuning, float model untouched.
    assert record.thresholds[""]["before"] == original == [float(t) for t in model.thresholds]

    model, _ = zoo_model("moe_pp")
    x = zoo.entry("moe_pp").load_data().split("val").input()[:20]
    qmodel, record = calibrate(model, x, config)
    (route,) = record.augmentation
    assert (route.kind, route.gate, route.before) == ("top_k", "moe.router", 2.0) and route.after > 2
    assert route.rows_before < 20 == route.rows_after
    experts = [q for path, q in record.plan.layers.items() if path.startswith("moe.experts.")]
    assert len(experts) == 12 and all(q.samples == 20 for q in experts)
    # (embed is left out: digits pixels span exactly [0, 1], so its calibrated scale *is* 1/255.)
    assert all(abs(q.act_scale - default) > 1e-6 for q in experts)
    assert qmodel.moe.router.k == 2 and model.moe.router.k == 2
    with torch.no_grad():  # zero-weight extra routes never changed the model's function
        out, _ = qmodel(torch.from_numpy(x))  # eval: (logits, route_indices)
    assert qmodel.moe.router.last_decision.shape == (20, 2) and torch.isfinite(out).all()


def test_layers_without_rows_fall_back_to_naive_and_dead_layers_stay_float(zoo_model):
    model, _ = zoo_model("early_exit")
    val = torch.from_numpy(zoo.entry("early_exit").load_data().split("val").input())
    with torch.no_grad():
        _, exit_index = model(val)
    x = val[exit_index == 0][:20]  # every sample leaves at exit 0: stages 1 and 2 get nothing
    config = QuantConfig(augment=False, **ONCE)
    qmodel, record = calibrate(model, x, config)
    assert {(f.layer, f.action, f.rows) for f in record.fallbacks} == {("stages.1.0", "naive", 20),
                                                                       ("stages.2.0", "naive", 20)}
    assert record.coverage.layers["stages.1.0"] == 0 and record.calibrated.layers["stages.1.0"] == 20
    default = _default_scale(config)
    assert all(abs(q.act_scale - default) > 1e-6 for q in record.plan.layers.values())

    class WithDeadLayer(nn.Module):
        input_names = ("x",)

        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x):
            return self.used(x)

    qmodel, record = calibrate(WithDeadLayer().eval(), torch.randn(40, 4))
    (fallback,) = record.fallbacks
    assert (fallback.layer, fallback.action) == ("unused", "float")
    assert "unused" in record.plan.float_layers and "unused" not in record.plan.layers
    assert type(qmodel.unused) is nn.Linear


# -------------------------------------------------------------------------------------------- bad data


@pytest.mark.parametrize(("make", "match"), [
    (lambda x: x[:0], "input 'x' is empty"),
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x).astype(np.float32), "1 NaN/Inf"),
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) < 3, np.inf, x).astype(np.float32), "3 NaN/Inf"),
    (lambda x: x[:, :10], r"input 'x' of shape \(150, 10\).*does not fit the model"),
    (lambda x: torch.from_numpy(x[:, :10]), r"input 'x' of shape \(150, 10\)"),
    (lambda x: x.astype(np.float64), "input 'x'.*float64 does not fit"),
    (lambda x: list(x), "must be a numpy array or a torch tensor"),
])
def test_bad_calibration_data_is_a_data_error_naming_the_input(make, match, zoo_model):
    model, _ = zoo_model("early_exit")
    x = zoo.entry("early_exit").load_data().split("val").input()[:150]
    with pytest.raises(DataError, match=match):
        calibrate(model, make(x))


def test_bad_evaluation_labels_are_a_data_error(calibrated):
    model, qmodel, _, data = calibrated("early_exit", **ONCE)
    x = data.split("test").input()
    with pytest.raises(DataError, match=r"'labels' has shape \(3,\)"):
        measure_fidelity(model, qmodel, x, np.zeros(3, dtype=np.int64))
    with pytest.raises(DataError, match="evaluation data: input 'x' has 1 NaN"):
        bad = x.copy()
        bad[0, 0] = np.nan
        measure_fidelity(model, qmodel, bad)


def test_record_is_manifest_ready(calibrated):
    _, _, record, _ = calibrated("moe_pp", **ONCE)
    d = json.loads(json.dumps(record.to_dict()))
    assert d["config"]["gate_precision"] == "float" and d["samples"] == 270
    assert d["plan"]["float_layers"] == ["moe.const_mix", "moe.router.proj"]
    assert d["float_layers"]["moe.router.proj"] == "router projection of moe.router"
    assert d["coverage"]["slots"]["moe"] and d["bias_corrections"]
    assert record.plan.layers["embed"].weight_int.dtype == np.int8  # arrays stay on the plan object
