"""The fidelity-target search, its margin-based estimate, the held-out rows and their 95% intervals.

Real zoo models (the session ``zoo_model`` fixture, seed 0) calibrated on their ``val`` split. The
early-exit MLP is the model that needs the whole ladder: 8-bit everywhere moves ~1% of its exit
decisions, so the search only meets 0.995 by keeping the stages in front of the exits at higher
precision. The threshold-gate MLP meets it with plain int8, at the first try.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from edgegate import zoo
from edgegate.calibration import calibrate, measure_fidelity
from edgegate.calibration.inputs import as_inputs
from edgegate.calibration.margins import Decisions, estimate, expected_disagreement
from edgegate.calibration.search import SAFETY_SE, Means, describe, feeders
from edgegate.cli import build_parser
from edgegate.data import TensorSpec, split_data
from edgegate.gates import find_gates
from edgegate.metrics import sqnr_db, wilson
from edgegate.quantization import QuantConfig
from edgegate.quantization.plan import QdqForm
from edgegate.quantization.step import QuantOptions, fidelity_warnings, quantize_for_export
from edgegate.reports.bundle_text import quant_lines

LADDER = [m.value for m in Means]  # the order of cost


@pytest.fixture(scope="module")
def searched(zoo_model):
    """``searched(name, **config) -> (float model, quantized model, record, calibration rows)``, cached."""
    cache: dict = {}

    def get(name: str, **config):
        key = (name, tuple(sorted(config.items())))
        if key not in cache:
            model, _ = zoo_model(name)
            x = zoo.entry(name).load_data().split("val").input()
            cache[key] = (model, *calibrate(model, x, QuantConfig(**config)), x)
        return cache[key]

    return get


# ---------------------------------------------------------------------------------------- the intervals


def test_sqnr_sums_float64_a_slice_at_a_time():
    """As exact as float64 copies of the whole arrays, without them (a causal LM's logits: 2 GiB transient)."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(3, 1 << 20)).astype(np.float32)  # three slices
    noisy = ref + np.float32(1e-2) * rng.normal(size=ref.shape).astype(np.float32)
    r, t = ref.astype(np.float64), noisy.astype(np.float64)
    assert sqnr_db(ref, noisy) == pytest.approx(10 * np.log10(np.square(r).sum() / np.square(r - t).sum()), rel=1e-9)
    assert sqnr_db(ref, noisy) == pytest.approx(40.0, abs=0.05)
    assert sqnr_db(ref, ref) == float("inf") and sqnr_db(np.zeros(4), np.ones(4)) == float("-inf")


@pytest.mark.parametrize(("k", "n"), [(0, 270), (1, 270), (266, 270), (270, 270), (3383, 3400), (50, 100)])
def test_wilson_interval_is_scipys(k, n):
    want = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    got = wilson(k / n, n)
    assert (got.low, got.high) == pytest.approx((want.low, want.high), abs=1e-12)
    assert got.low <= got.value <= got.high and got.rows == n


def test_wilson_interval_shows_what_a_row_count_can_resolve():
    assert wilson(1.0, 270).low == pytest.approx(0.98597, abs=1e-5)  # 270 clean rows: only >= 0.986
    narrow = wilson(0.997, 3400)
    assert narrow.high - narrow.low < 0.005  # 3 400 rows resolve half a percent
    assert (wilson(0.5, 0).low, wilson(0.5, 0).high) == (0.0, 1.0)
    assert wilson(1.2, 10).value == 1.0 and wilson(0.0, 10).low == 0.0
    assert json.loads(json.dumps(narrow.to_dict())) == {"value": 0.997, "low": narrow.low, "high": narrow.high,
                                                        "rows": 3400}


# ------------------------------------------------------------------------------------ the estimator


def test_expected_disagreement_pairs_each_margin_with_every_error_of_its_group():
    fm = np.array([1.0, 2.0, 3.0, -1.0])
    err = np.array([-1.5, 0.0, 0.0, 0.0])  # row 0 flips (1 - 1.5 < 0); nothing else does
    pooled = Decisions("g", "exit_agreement", fm, fm + err, np.arange(4), np.zeros(4, dtype=np.int64), 4)
    # margin 1 flips under 1 error of 4, margins 2 and 3 under none; margin -1 would need an error >= 1
    assert expected_disagreement(pooled)[0] == pytest.approx(0.25 / 4)
    split = Decisions("g", "exit_agreement", fm, fm + err, np.arange(4), np.array([0, 0, 1, 1]), 4)
    assert expected_disagreement(split)[0] == pytest.approx(0.5 / 4)  # row 0 now sees 2 errors, one crossing
    e = estimate(pooled)
    assert (e.value, e.expected) == (pytest.approx(0.75), pytest.approx(1 - 0.0625)) and e.rows == 4
    assert e.se > 0
    mask = Decisions("m", "mask_hamming", fm, fm + err, np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]), 4)
    assert estimate(mask).value == pytest.approx(0.25)  # a disagreement: Hamming, not 1 - Hamming


def test_feeders_are_the_layers_that_run_before_each_gate_decides(zoo_model):
    for name, gate, want in (("early_exit", "", ["stages.1.0", "heads.0", "stages.0.0"]),
                             ("moe_pp", "moe.router", ["embed"]), ("threshold_gate", "gate", ["fc1"])):
        model, _ = zoo_model(name)
        x = as_inputs(zoo.entry(name).load_data().split("val").input()[:8], model)
        assert feeders(model, x, find_gates(model))[gate] == want, name


# -------------------------------------------------------------------------------------------- the search


def test_search_tries_means_by_cost_and_stops_at_the_first_that_meets_the_target(searched):
    model, qmodel, record, x = searched("early_exit")
    s = record.search
    means = [t.means for t in s.tries]
    assert means[:5] == ["int8", "retune", "bias_correction", "observer", "observer"]
    assert [LADDER.index(m) for m in means] == sorted(LADDER.index(m) for m in means)  # never back down the ladder
    assert {t.settings["observer"] for t in s.tries[3:5]} == {"minmax", "mse"}  # the ones not asked for
    assert (s.tries[0].settings["retune_thresholds"], s.tries[0].settings["bias_correction"]) == (False, False)
    assert (s.tries[2].settings["retune_thresholds"], s.tries[2].settings["bias_correction"]) == (True, True)
    # It stopped at the first try that met the target: every earlier one missed, nothing ran after it.
    assert s.met and s.chosen == len(s.tries) - 1 and all(not t.passed for t in s.tries[:-1])
    assert all(t.margin < 0 for t in s.tries[:-1]) and s.tries[-1].margin >= 0 and s.warning is None
    for t in s.tries:
        (gate,) = [e for e in t.measured if e.metric == "exit_agreement"]
        assert gate.rows == len(x) == 600 and 0 < gate.se < 0.01
        assert t.margin == pytest.approx(min(gate.value, gate.expected - SAFETY_SE * gate.se) - 0.995)
    chosen = s.tries[-1].settings
    assert chosen["a16_layers"] + chosen["float_layers"]  # 8-bit everywhere cannot hold the exits
    assert record.config.a16_layers == tuple(chosen["a16_layers"])
    assert set(chosen["float_layers"]) <= set(record.plan.float_layers)
    # What it chose holds on the 3 400 rows it never saw, as it did not without the promotions.
    data = zoo.entry("early_exit").load_data()
    held = data.subset(np.concatenate([data.splits["test"], data.splits["train"]])).input()
    assert measure_fidelity(model, qmodel, held)["summary"]["exit_agreement"] >= 0.995
    d = json.loads(json.dumps(record.to_dict()))["search"]
    assert d["chosen"] == {"try": s.chosen, "means": s.tries[-1].means, **chosen} and len(d["tries"]) == len(means)


def test_a_model_that_meets_the_target_without_promotions_stops_there(searched):
    """int8 and int8 + bias correction come from one observation and cost nothing at inference: both are
    judged, the better kept; they meet the target, so no observer is tried and no layer promoted."""
    _, _, record, _ = searched("threshold_gate")
    s = record.search
    assert [t.means for t in s.tries] == ["int8", "bias_correction"] and s.met and s.metrics == ("mask_hamming",)
    assert all(t.passed for t in s.tries) and s.chosen == max(range(2), key=lambda i: (s.tries[i].margin, -i))
    assert record.a16 is None and record.config.float_layers == () and record.config.a16_layers == ()
    hamming = [next(e for e in t.measured if e.metric == "mask_hamming") for t in s.tries]
    assert all(h.rows == 270 * 128 for h in hamming)  # a decision per sample and neuron
    assert hamming[s.chosen].value == min(h.value for h in hamming) <= 0.005


def test_an_unreachable_target_is_one_warning_line_with_the_best_value(searched):
    _, _, record, x = searched("early_exit", fidelity_target=0.9999, max_promoted_layers=0)
    s = record.search
    assert [t.means for t in s.tries] == ["int8", "retune", "bias_correction", "observer", "observer"]
    assert not s.met and s.chosen == max(range(5), key=lambda i: (s.tries[i].margin, -i))
    (best,) = [e for e in s.tries[s.chosen].measured if e.metric == "exit_agreement"]
    assert s.warning == (f"fidelity target 0.9999 not met on the 600 calibration rows: the best of 5 tries "
                         f"({describe(s.tries[s.chosen])}) reaches exit agreement {best.value:.4f} (expected "
                         f"{best.expected:.4f} +- {best.se:.4f}) at ExitMLP; exported with it")
    assert "\n" not in s.warning and best.value < 0.9999
    # The manifest keeps it as a warning; inspect / export print it (and the CLI once more on stderr).
    quant = {"scheme": "int8", **record.to_dict()}
    quant["warnings"] = fidelity_warnings(quant, 0.9999)
    assert quant["warnings"] == [s.warning]
    text = "\n".join(quant_lines({"quant": quant}))
    assert f"Warnings     : {s.warning}" in text and "Target       : 0.9999 NOT met by try" in text


def test_held_out_rows_that_miss_the_target_are_a_warning_too(searched, zoo_model):
    """The search judged the calibration rows; a gate that then misses on held-out rows is said, with its CI."""
    model, _, met, _ = searched("early_exit")
    _, plain, _, _ = searched("early_exit", fidelity_target=0)  # 8-bit everywhere: ~0.99 exit agreement
    data = zoo.entry("early_exit").load_data()
    held = data.subset(np.concatenate([data.splits["test"], data.splits["train"]]))
    fid = {**measure_fidelity(model, plain, held.input()), "measured_on": "held_out"}
    value, ci = fid["summary"]["exit_agreement"], fid["intervals"]["exit_agreement"]
    (line,) = fidelity_warnings({**met.to_dict(), "fidelity": fid}, 0.995)
    assert line == (f"held-out exit agreement {value:.4f} (95% CI {ci['low']:.4f}-{ci['high']:.4f}, 3400 rows) "
                    "misses the fidelity target 0.995 that the calibration rows met")
    assert fidelity_warnings({**met.to_dict(), "fidelity": {**fid, "measured_on": "calibration"}}, 0.995) == []


def test_naive_calibration_and_a_zero_target_calibrate_once(searched):
    for config in ({"calibration": "naive"}, {"fidelity_target": 0}):
        _, _, record, _ = searched("threshold_gate", **config)
        assert record.search is None


def test_fidelity_target_flag():
    parser = build_parser()
    assert parser.parse_args(["export", "m.pt"]).fidelity_target == 0.995
    assert parser.parse_args(["export", "m.pt", "--fidelity-target", "0.99"]).fidelity_target == 0.99
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["export", "m.pt", "--fidelity-target", "1.5"])
    assert e.value.code == 2
    with pytest.raises(Exception, match="fidelity_target=1.5 must be in"):
        QuantConfig(fidelity_target=1.5)


# ---------------------------------------------------------------------------------- the held-out rows


def test_built_ins_hold_out_every_row_they_do_not_calibrate_on():
    data = zoo.entry("moe").load_data()
    calib, held = split_data(data)  # val + 627 train rows calibrate (see test_data_split.py)
    assert len(calib) == 897 and len(held) == 1797 - 897 == 900
    test, train = data.splits["test"], data.splits["train"]
    assert np.array_equal(held.split("test").input(), data.input()[test])  # unseen rows first
    assert len(held.split("train")) == len(train) - 627
    assert np.array_equal(held.labels[:len(test)], data.labels[test])


def test_export_records_rows_intervals_and_accuracy_on_unseen_rows(zoo_model):
    model, _ = zoo_model("threshold_gate")
    calib, held = split_data(zoo.entry("threshold_gate").load_data())
    q = quantize_for_export(model, find_gates(model), QuantOptions(scheme="int8"), QdqForm.ASYMMETRIC, calib, held,
                            TensorSpec("x", (64,), "float32"))
    fid = q.record["fidelity"]
    assert (fid["samples"], fid["trained_rows"], fid["measured_on"]) == (900, 630, "held_out")
    assert fid["accuracy"]["samples"] == fid["loss"]["samples"] == 270
    assert fid["accuracy"]["float"] - fid["accuracy"]["quant"] <= 0.005
    iv = fid["intervals"]
    assert iv["accuracy"]["rows"] == 270 and iv["top1_agreement"]["rows"] == 900
    hamming = iv["mask_hamming"]  # counted per sample (900), not per bit (900 x 128): conservative
    assert hamming["rows"] == 900 and hamming["value"] == fid["summary"]["mask_hamming"] <= hamming["high"] < 0.01
    gate = fid["gates"]["gate"]
    assert gate["rows"] == 900 and gate["intervals"]["mask_hamming"] == hamming
    assert q.record["search"]["met"] and q.record["warnings"] == []
    with torch.no_grad():  # the record's accuracy is the test split's, as the float model scores it
        logits = model(torch.from_numpy(held.split("test").input()))
    assert fid["accuracy"]["float"] == pytest.approx(float((logits.argmax(1).numpy() == held.split("test").labels)
                                                            .mean()))
