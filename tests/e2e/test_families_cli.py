"""Issue 18's two gated families end to end: MoDES expert skipping (``export --moe-skip auto``) on the zoo MoE
and the zoo ACM, exported through the real CLI to cpu (INT8 gate-aware), their behaviour checked on the
held-out test split against the float model, and benched (skipped-slot fraction, histogram of k)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgegate import zoo
from edgegate.benchmark import BenchConfig, bench
from edgegate.data import load_data
from edgegate.loading import save
from edgegate.reports.skip_sweep import with_skip_threshold
from tests._cli import edgegate

BENCH = BenchConfig(runs=8, warmup=1, batch=64)


def _export(zoo_model, tmp_path_factory, name: str, *args: str) -> tuple[Path, Any, str]:
    """The session's trained zoo model saved as a checkpoint, then ``edgegate export`` on it (a subprocess)."""
    model, metrics = zoo_model(name)
    work = tmp_path_factory.mktemp(name)
    save(model, work / f"{name}.pt", meta=zoo.checkpoint_meta(name, metrics, 0))
    r = edgegate("export", f"{name}.pt", "--quant", "int8", *args, "-o", "b.edgegate", cwd=work)
    assert r.returncode == 0, r.stderr
    return work / "b.edgegate", model, r.stdout


def _test_split(name: str) -> tuple[np.ndarray, np.ndarray]:
    test = load_data(name).split("test")
    return test.input().astype(np.float32), test.labels


def _run(bundle: Path, x: np.ndarray, proto: onnx.ModelProto | None = None) -> list[np.ndarray]:
    model = proto.SerializeToString() if proto is not None else str(bundle / "model.onnx")
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})


@pytest.fixture(scope="session")
def moe_skip(zoo_model, tmp_path_factory):
    # --fidelity-target 0.99: the agreement bar (the default 0.995 only adds tries).
    return _export(zoo_model, tmp_path_factory, "moe", "--calib", "digits", "--moe-skip", "auto",
                   "--fidelity-target", "0.99")


@pytest.fixture(scope="session")
def acm_int8(zoo_model, tmp_path_factory):
    return _export(zoo_model, tmp_path_factory, "acm", "--calib", "clusters", "--fidelity-target", "0.99")


def test_moe_skip_auto_skips_a_quarter_of_the_slots_within_half_a_point(moe_skip):
    bundle, model, stdout = moe_skip
    m = json.loads((bundle / "manifest.json").read_text())
    skip = m["moe_skip"]
    assert (skip["mode"], skip["metric"], skip["budget"]) == ("auto", "accuracy", 0.005)
    assert skip["importance"] == {"moe.router": 1.0} and skip["tau"] > 0
    assert skip["calibration"]["skip_rate"] >= 0.25
    assert skip["calibration"]["unskipped"] - skip["calibration"]["skipped"] <= 0.005
    assert m["gates"]["gates"][0]["details"]["skip_threshold"] == skip["tau"]
    shown = re.search(r"MoE skip     : auto, tau (\S+) ", stdout)  # the text rounds tau (0.5, 0.3815)
    assert shown and abs(float(shown.group(1)) - skip["tau"]) < 5e-5, stdout

    # The float model on the test split (never seen by training, calibration or the search).
    x, y = _test_split("digits")
    router = model.moe.router
    with torch.no_grad():
        router.set_skip(1.0, 0.0)
        plain_logits, plain_routes = (t.numpy() for t in model(torch.from_numpy(x)))
        router.set_skip(skip["importance"]["moe.router"], skip["tau"])
        logits, routes = (t.numpy() for t in model(torch.from_numpy(x)))
    assert (plain_routes >= 0).all()
    rate = float((routes < 0).mean())
    assert rate >= 0.25, rate
    drop = float((plain_logits.argmax(1) == y).mean() - (logits.argmax(1) == y).mean())
    assert drop <= 0.005, drop

    # The INT8 bundle skips the same slots: -1 in its route output, weight exactly 0 (nothing to compute).
    proto, weight_names = with_skip_threshold(onnx.load(bundle / "model.onnx"), skip["tau"])
    q_logits, q_routes, q_weights = _run(bundle, x, proto)[:3]
    assert weight_names and q_weights.shape == q_routes.shape
    np.testing.assert_array_equal(q_weights[q_routes < 0], 0.0)
    assert (q_weights[q_routes >= 0] > 0).all()
    same_set = (np.sort(q_routes, -1) == np.sort(routes, -1)).all(-1).mean()
    assert same_set >= 0.99 and abs(float((q_routes < 0).mean()) - rate) <= 0.01
    fid = m["quant"]["fidelity"]
    assert fid["measured_on"] == "held_out" and fid["summary"]["topk_set_agreement"] >= 0.99

    route = bench(bundle, BENCH).routes[0]
    assert route.skipped_fraction >= 0.25 and route.skipped + sum(route.counts) == BENCH.runs * 64 * 2


def test_acm_exports_compacted_int8_with_learner_count_agreement(acm_int8, zoo_model):
    bundle, model, stdout = acm_int8
    _, metrics = zoo_model("acm")
    m = json.loads((bundle / "manifest.json").read_text())
    ops = [n.op_type for n in onnx.load(bundle / "model.onnx").graph.node]
    assert ops.count("LearnerCount") == 1 and ops.count("NonZero") == 4 and "If" not in ops  # per-learner rows
    fid = m["quant"]["fidelity"]
    assert fid["measured_on"] == "held_out" and fid["summary"]["count_agreement"] >= 0.99
    assert "acm: learner-count agreement" in stdout

    x, y = _test_split("clusters")
    with torch.no_grad():
        logits, k = (t.numpy() for t in model(torch.from_numpy(x)))
        model.acm.fixed_k = model.acm.n_learners
        all_logits = model(torch.from_numpy(x))[0].numpy()
        model.acm.fixed_k = None
    q_logits, q_k = _run(bundle, x)
    assert float((q_k == k).mean()) >= 0.99
    mean_k = float(q_k.mean())
    assert mean_k <= 0.6 * model.acm.n_learners, mean_k
    all_acc = float((all_logits.argmax(1) == y).mean())
    assert float((q_logits.argmax(1) == y).mean()) >= all_acc - 0.01
    assert metrics["mean_learners"] == pytest.approx(float(k.mean()))

    learners = bench(bundle, BENCH).learners[0]
    assert (learners.gate, learners.output, len(learners.counts)) == ("acm", "learner_count", 5)
    assert sum(learners.counts) == BENCH.runs * 64 and learners.mean <= 0.6 * 4


@pytest.mark.slow  # a second engine build; tests/e2e/test_trt_cli.py builds one in the default tier
def test_acm_int8_builds_a_tensorrt_engine(zoo_model, tmp_path_factory):
    # TensorRT-RTX builds engines without a GPU; running one needs a GPU, so ORT checks the lowered graph here.
    bundle, _, stdout = _export(zoo_model, tmp_path_factory, "acm", "--target", "trt", "--calib", "clusters",
                                "--fidelity-target", "0.99")
    m = json.loads((bundle / "manifest.json").read_text())
    build = m["target_options"]["build"]
    assert m["target"] == "trt" and build["plugins"] == {"LearnerCount": "inlined"}
    assert (bundle / "engine.plan").stat().st_size == build["engine_bytes"] > 0
    layers = [layer["type"] for layer in json.loads((bundle / "network.json").read_text())["layers"]]
    assert layers.count("SCATTER") == 4 and "QUANTIZE" in layers  # per-learner compaction, int8 learners
    assert m["golden"]["vs_torch"]["learner_count_agreement"] >= 0.98
    assert m["quant"]["fidelity"]["summary"]["count_agreement"] >= 0.99


def test_compare_reports_the_skip_sweep_and_learner_counts(moe_skip, acm_int8):
    from edgegate.comparison import CompareConfig, compare
    from edgegate.reports.compare_text import render_text

    bundle, _, _ = moe_skip
    report = compare(bundle.parent / "moe.pt", [bundle], CompareConfig("digits", runs=5, warmup=1, layer_samples=32))
    d = report.to_dict()
    assert d["version"] == 4
    float_row, row = d["rows"]
    skip = json.loads((bundle / "manifest.json").read_text())["moe_skip"]
    for r in (float_row, row):
        sweep = r["skip_sweep"]
        assert [p["tau"] for p in sweep] == pytest.approx([f * skip["tau"] for f in (0, .25, .5, .75, 1, 1.25, 1.5, 2)])
        rates = [p["skip_rate"] for p in sweep]
        assert rates[0] == 0 and rates == sorted(rates) and rates[4] >= 0.25
    assert row["metrics"]["skip_rate"] == pytest.approx(row["skip_sweep"][4]["skip_rate"], abs=0.01)
    assert row["metrics"]["topk_set_agreement"] >= 0.99 and row["intervals"]["topk_set_agreement"]["rows"] == 270
    assert "skip sweep" in render_text(report)

    bundle, _, _ = acm_int8
    d = compare(bundle.parent / "acm.pt", [bundle], CompareConfig("clusters", runs=5, warmup=1,
                                                                  layer_samples=32)).to_dict()
    float_row, row = d["rows"]
    assert row["metrics"]["count_agreement"] >= 0.99 and row["intervals"]["count_agreement"]["rows"] == 600
    assert row["metrics"]["mean_learners"] <= 0.6 * 4 and float_row["skip_sweep"] == []
    assert len(row["histograms"]["learner_count"]) == 5
