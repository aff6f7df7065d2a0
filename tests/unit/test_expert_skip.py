"""MoDES expert skipping: the router drops slots with weight exactly 0 and the sparse dispatch never runs them,
``--moe-skip`` parses strictly, calibration finds alpha_l and the largest tau within budget, and compare's
float sweep moves along accuracy vs skip rate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgegate import nn as enn
from edgegate.calibration.expert_skip import SkipMode, SkipOption, calibrate_skip
from edgegate.data import Inputs, load_data
from edgegate.errors import EdgegateError
from edgegate.gates import find_gates
from edgegate.reports.skip_sweep import TAU_FACTORS, float_sweep


def test_skip_option_parses_auto_off_and_a_threshold_and_refuses_the_rest():
    assert SkipOption.parse("auto") == SkipOption(SkipMode.AUTO, None, 0.005)
    assert SkipOption.parse(" OFF ", 0.01) == SkipOption(SkipMode.OFF, None, 0.01)
    assert SkipOption.parse("0.25") == SkipOption(SkipMode.FIXED, 0.25, 0.005)
    with pytest.raises(EdgegateError, match="--moe-skip 'most' must be auto, off or a threshold TAU"):
        SkipOption.parse("most")
    with pytest.raises(EdgegateError, match="--moe-skip -1: the threshold TAU must be a finite number >= 0"):
        SkipOption.parse("-1")
    with pytest.raises(EdgegateError, match="--moe-skip-budget 150 must be >= 0 and < 100"):
        SkipOption.parse("auto", 1.5)


def test_skipped_slots_get_weight_zero_and_reach_no_expert():
    torch.manual_seed(0)
    moe = enn.MoE(8, 16, 4, 2).eval()
    x = torch.randn(300, 8)
    with torch.no_grad():
        w_all, idx = moe.router(x)
        tau = float(w_all.flatten().quantile(0.3))
        moe.router.set_skip(1.0, tau)
        w, idx_skip = moe.router(x)
    np.testing.assert_array_equal(idx_skip, idx)  # skipping changes weights, never the choice
    dropped = w_all < tau
    assert 0.2 < float(dropped.float().mean()) < 0.4 and not dropped[:, 0].any()  # the top slot is >= 1/2
    assert (w[dropped] == 0).all() and torch.equal(w[~dropped], w_all[~dropped])  # no renormalisation

    rows = [0] * 4
    hooks = [e.register_forward_pre_hook(lambda m, a, i=i: rows.__setitem__(i, rows[i] + a[0].shape[0]))
             for i, e in enumerate(moe.experts)]
    with torch.no_grad():
        y, routed = moe.forward_routed(x)
    for h in hooks:
        h.remove()
    assert torch.equal(routed < 0, dropped)
    assert rows == [int((routed == e).sum()) for e in range(4)] and sum(rows) == int((~dropped).sum())
    moe.dispatch = "dense"  # every expert on every token, weighted: the reference
    with torch.no_grad():
        torch.testing.assert_close(moe(x), y, rtol=1e-5, atol=1e-5)
    assert moe.router.get_config()["skip_threshold"] == tau
    assert enn.TopKRouter(**moe.router.get_config()).skips
    with pytest.raises(EdgegateError, match="must be >= 0"):
        moe.router.set_skip(1.0, float("nan"))


@pytest.fixture(scope="module")
def digits_val():
    data = load_data("digits").split("val")
    return Inputs({"x": torch.from_numpy(data.input().astype(np.float32))}), data.labels


def test_calibrate_skip_finds_the_largest_tau_within_the_budget(zoo_model, digits_val):
    model, _ = zoo_model("moe")
    x, y = digits_val
    gate_map = find_gates(model)
    record = calibrate_skip(model, gate_map, x, y, SkipOption.parse("auto"))
    assert record.importance == {"moe.router": 1.0} and record.sensitivity["moe.router"] > 0
    assert model.moe.router.skip_threshold == record.tau > 0
    cal = record.calibration
    assert cal["skip_rate"] >= 0.25 and cal["unskipped"] - cal["skipped"] <= 0.005
    assert {p["tau"] for p in record.search} >= {record.tau} and len(record.search) >= 3  # bisection
    assert all(p["within"] == (cal["unskipped"] - p["metric"] <= 0.005 + 1e-9) for p in record.search)
    assert max(p["skip_rate"] for p in record.search if p["within"]) == cal["skip_rate"]

    strict = calibrate_skip(model, gate_map, x, y, SkipOption.parse("auto", 0.0))
    assert strict.tau <= record.tau and strict.calibration["skipped"] >= strict.calibration["unskipped"]
    fixed = calibrate_skip(model, gate_map, x, y, SkipOption.parse("0.1"))
    assert fixed.mode is SkipMode.FIXED and fixed.tau == 0.1 and len(fixed.search) == 1

    with pytest.raises(EdgegateError, match="--moe-skip needs a model with MoE routers"):
        calibrate_skip(torch.nn.Linear(64, 10), find_gates(torch.nn.Linear(64, 10)), x, y, SkipOption.parse("auto"))


def test_float_sweep_trades_skip_rate_for_accuracy(zoo_model, digits_val):
    model, _ = zoo_model("moe")
    x, y = digits_val
    skip = {"tau": 0.4, "importance": {"moe.router": 1.0}}
    points = float_sweep(model, x.map(lambda t: t.numpy()), y, skip)
    assert [p["tau"] for p in points] == pytest.approx([f * 0.4 for f in TAU_FACTORS])
    rates = [p["skip_rate"] for p in points]
    assert rates[0] == 0 and rates == sorted(rates) and rates[-1] > 0.4
    assert points[-1]["accuracy"] < points[0]["accuracy"]
    assert model.moe.router.skip_threshold == 0  # the sweep leaves the model as it found it
