"""The snn target's default settings are chosen from calibration: below the int8 ANN's energy estimate per
sample, within 1 point of the accuracy of the full 128-step run without early decision (digits zoo model)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from edgegate.snn.tune import MAX_AGREEMENT_LOSS
from edgegate.targets import CompileContext
from edgegate.targets.snn import SnnOptions, SnnTarget

sys.path.insert(0, str(Path(__file__).parent))
from test_snn_accuracy import _export  # noqa: E402  (the pipeline's way to a lowered snn graph)

TARGET = SnnTarget()


def _run(proto, calib, x, y, tmp_path, **options):
    ctx = CompileContext(input_name="x", output_names=("logits",), calibration=calib)
    art = TARGET.compile(proto, TARGET.options_for_export({k: str(v) for k, v in options.items()}, ctx), tmp_path)
    with TARGET.load(art) as runner:
        acc = float(np.mean(runner.run({"x": x})["logits"].argmax(1) == y))
        return art, acc, runner.metrics()


@pytest.mark.parametrize("quant", ["int8"])
def test_default_energy_below_int8_ann_at_one_point(zoo_model, tmp_path, quant):
    proto, calib, x, y = _export(zoo_model("threshold_gate")[0], "threshold_gate", quant)
    art, acc, m = _run(proto, calib, x, y, tmp_path)
    _, acc_full, m_full = _run(proto, calib, x, y, tmp_path, timesteps=128, early_decision="off")
    print(f"threshold_gate {quant}: default {m['energy_pj_per_sample']:.0f} pJ at {acc:.4f} "
          f"({art.options['timesteps']} steps, early {art.options['early_decision']}), 128 steps "
          f"{m_full['energy_pj_per_sample']:.0f} pJ at {acc_full:.4f}, ANN {m['ann_energy_pj_per_sample']:.0f} pJ")
    assert m["energy_pj_per_sample"] < m["ann_energy_pj_per_sample"] < m_full["energy_pj_per_sample"]
    assert m["energy_vs_ann"] == pytest.approx(m["energy_pj_per_sample"] / m["ann_energy_pj_per_sample"])
    assert acc >= acc_full - 0.01
    tuning = art.options["tuning"]
    chosen, ref = tuning["chosen"], tuning["reference"]
    assert (chosen["timesteps"], chosen["early"]) == (art.options["timesteps"], art.options["early_decision"] == "on")
    assert chosen["agreement"] >= ref["agreement"] - MAX_AGREEMENT_LOSS
    # The choice is the cheapest trial within the agreement bound.
    ok = [t for t in tuning["trials"] if t["agreement"] >= ref["agreement"] - MAX_AGREEMENT_LOSS]
    assert chosen["energy_pj_per_sample"] == min(t["energy_pj_per_sample"] for t in ok)
    assert SnnOptions.from_manifest(art.options).timesteps == art.options["timesteps"]


def test_given_timesteps_are_kept(zoo_model, tmp_path):
    proto, calib, x, y = _export(zoo_model("threshold_gate")[0], "threshold_gate", "fp32")
    art, _, m = _run(proto, calib, x[:32], y[:32], tmp_path, timesteps=40)
    assert art.options["timesteps"] == 40 and {t["timesteps"] for t in art.options["tuning"]["trials"]} == {40}
    assert m["timesteps_to_decision"]["max"] <= 40
