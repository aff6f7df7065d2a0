"""edgegate.comparison: float model vs bundles, gate fidelity from bundle outputs, per-layer SQNR, sweep, reports.

Real zoo models (the session ``zoo_model`` fixture), real bundles from the export pipeline, run by the
real ``cpu`` target. Bundles are exported once per module: early_exit int8 (gate-aware) and moe fp32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgegate import zoo
from edgegate.comparison import SWEEP, CompareConfig, CompareError, compare
from edgegate.errors import DataError, EdgegateError
from edgegate.loading import save
from edgegate.pipeline import ExportConfig, run_export
from edgegate.reports.compare_record import FORMAT
from edgegate.reports.compare_text import render_text
from edgegate.reports.html import write_html
from tests._report import PNG_MAGIC, page_images

QUICK = {"runs": 20, "warmup": 2}


def _saved(zoo_model, name: str, path: Path) -> Path:
    model, metrics = zoo_model(name)
    save(model, path, meta=zoo.checkpoint_meta(name, metrics, 0))
    return path


@pytest.fixture(scope="module")
def ee(zoo_model, tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("ee")
    model = _saved(zoo_model, "early_exit", work / "early_exit.pt")
    return model, run_export(model, work / "ee-int8", ExportConfig(quant="int8"))


@pytest.fixture(scope="module")
def moe(zoo_model, tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("moe")
    model = _saved(zoo_model, "moe", work / "moe.pt")
    return model, run_export(model, work / "moe-fp32", ExportConfig(quant="fp32"))


@pytest.fixture(scope="module")
def ee_report(ee):
    model, bundle = ee
    return compare(model, [bundle], CompareConfig(data="clusters", baseline="naive", **QUICK))


# ---------------------------------------------------------------------------------------------- tests


def test_early_exit_rows_and_fidelity(ee, ee_report):
    _, bundle = ee
    rows = {r.name: r for r in ee_report.rows}
    assert list(rows) == ["float", bundle.name, f"{bundle.name} (naive)"]
    assert [r.kind for r in ee_report.rows] == ["float", "bundle", "baseline"]
    assert ee_report.data == {"name": "clusters", "split": "test", "samples": 600, "labels": True}
    f, q, n = rows["float"], rows[bundle.name], rows[f"{bundle.name} (naive)"]
    assert (q.quant, q.calibration, n.calibration) == ("int8", "gate_aware", "naive")
    assert all(r.status == "ok" for r in ee_report.rows)
    assert 0.9 < f.metrics["accuracy"] <= 1 and f.metrics["loss"] > 0
    for r in (q, n):
        assert set(r.metrics) == {"accuracy", "loss", "top1_agreement", "output_sqnr_db", "exit_agreement",
                                  "mean_exit_depth"}
        assert 0.9 < r.metrics["exit_agreement"] <= 1 and 0.9 < r.metrics["top1_agreement"] <= 1
        assert 1 <= r.metrics["mean_exit_depth"] <= 3
        assert sum(r.histograms["exit_index"]) == pytest.approx(1.0)
    # The bundle's outputs (ONNX Runtime, integer kernels) reproduce the fidelity measured at export on the
    # same held-out split with the fake-quant torch model.
    for key in ("exit_agreement", "top1_agreement"):
        assert q.metrics[key] == pytest.approx(q.recorded[key], abs=0.01)
    assert f.metrics["mean_exit_depth"] == pytest.approx(1 + np.dot(range(3), f.histograms["exit_index"]))


def test_percentiles_are_ordered_for_every_row(ee_report):
    for r in ee_report.rows:
        lat = r.latency
        assert 0 < lat.min_ms <= lat.median_ms <= lat.p90_ms <= lat.p95_ms <= lat.p99_ms <= lat.max_ms
        assert len(r.latencies_ms) == QUICK["runs"] and r.batch == 1


def test_exit_threshold_sweep(ee_report):
    for r in ee_report.rows:
        assert [p["threshold"] for p in r.sweep] == list(SWEEP)
        depth = [p["mean_exit_depth"] for p in r.sweep]
        assert depth == sorted(depth) and depth[0] < depth[-1]  # higher thresholds: fewer early exits
        assert all(0 < p["accuracy"] <= 1 for p in r.sweep)


def test_per_layer_sqnr_covers_every_stage(ee, ee_report):
    # Layers the fidelity search kept float reproduce the float model (inf, or round-off behind them).
    chosen = json.loads((ee[1] / "manifest.json").read_text())["quant"]["search"]["chosen"]["float_layers"]
    for r in ee_report.rows[1:]:
        layers = r.layer_sqnr_db
        assert {"stages.0.0", "stages.1.0", "stages.2.0", "heads.0", "heads.1", "heads.2"} <= set(layers)
        exact = set(chosen) if r.kind == "bundle" else set()
        assert all(layers[p] > 80 for p in exact), layers
        # int8: quantization noise, not garbage
        assert all(15 < v < 80 for p, v in layers.items() if p.startswith("stages.") and p not in exact), layers
    assert ee_report.rows[0].layer_sqnr_db == {}


def test_json_is_versioned_and_strict(ee_report):
    d = ee_report.to_dict()
    assert (d["format"], d["version"]) == (FORMAT, 4)
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert set(d) == {"format", "version", "model", "data", "rows", "notes"}
    row = d["rows"][1]
    assert set(row) == {"name", "kind", "path", "target", "quant", "calibration", "status", "note", "metrics",
                        "recorded", "latency", "batch", "layer_sqnr_db", "sweep", "skip_sweep", "histograms",
                        "device", "intervals"}
    assert row["device"] is None  # measured here, not by a device agent
    assert d["rows"][2]["path"] is None  # the baseline lived in a temp dir
    assert set(row["latency"]) == {"min_ms", "mean_ms", "median_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms",
                                   "std_ms", "cv"}


def test_agreements_carry_rows_and_wilson_intervals(ee_report):
    """Measured here on the 600 test rows; recorded at export on the 2 976 held-out rows (test + train)."""
    for r in ee_report.rows[1:]:
        for key in ("accuracy", "top1_agreement", "exit_agreement"):
            ci = r.intervals[key]
            assert ci["rows"] == 600 and ci["value"] == r.metrics[key]
            assert ci["low"] < ci["value"] <= ci["high"] <= 1 and ci["high"] - ci["low"] < 0.05
    recorded = ee_report.rows[1].recorded
    assert recorded["samples"] == 2976 and recorded["trained_rows"] == 2376
    ci = recorded["intervals"]["exit_agreement"]
    assert ci["rows"] == 2976 and ci["value"] == recorded["exit_agreement"] >= 0.995
    assert ci["high"] - ci["low"] < ee_report.rows[1].intervals["exit_agreement"]["high"] - \
        ee_report.rows[1].intervals["exit_agreement"]["low"]  # more rows, a narrower interval
    assert ee_report.rows[0].intervals == {}


def test_text_and_html_reports(ee_report, tmp_path):
    text = render_text(ee_report)
    for label in ("float", "ee-int8", "ee-int8 (naive)", "exit agr", "min layer SQNR dB", "p99 ms"):
        assert label in text
    q = ee_report.rows[1]
    ci = q.intervals["exit_agreement"]
    line = next(x for x in text.splitlines() if x.startswith("  ee-int8: measured here"))
    assert f"exit agr {ci['value']:.4f} [{ci['low']:.4f}, {ci['high']:.4f}] on 600" in line
    assert "recorded at export on 2976 held-out rows (2376 of them trained on): " in line
    page = write_html(ee_report, tmp_path / "report.html")
    assert "95% intervals (Wilson; rows counted):" in page.read_text()
    images = page_images(page)
    assert len(images) == 3
    for png in images:
        assert png[:8] == PNG_MAGIC and len(png) > 1000


def test_moe_routes_from_the_bundle(moe):
    model, bundle = moe
    report = compare(model, [bundle], CompareConfig(data="digits", max_samples=100, baseline="naive", **QUICK))
    f, q, naive = report.rows
    assert (naive.status, naive.kind) == ("skipped", "baseline") and "none given" in naive.note  # fp32 bundle
    assert q.metrics["topk_set_agreement"] == 1.0 and q.metrics["top1_expert_agreement"] == 1.0
    assert q.metrics["top1_agreement"] == 1.0 and q.metrics["output_sqnr_db"] > 60  # fp32: round-off only
    assert q.histograms["route_indices"] == pytest.approx(f.histograms["route_indices"])
    experts = {k: v for k, v in q.layer_sqnr_db.items() if k.startswith("moe.experts.")}
    assert len(experts) == 12 and all(v > 60 for v in experts.values())  # 4 experts x w1, w3, w2
    assert q.sweep == () and f.sweep == ()


def test_a_target_that_cannot_run_here_is_a_skip_line(moe, tmp_path):
    model, bundle = moe
    other = tmp_path / "elsewhere"
    shutil.copytree(bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["target"] = "npu_not_here"
    (other / "manifest.json").write_text(json.dumps(manifest))
    report = compare(model, [bundle, other], CompareConfig(data="digits", max_samples=50, **QUICK))
    skipped = report.rows[2]
    assert skipped.status == "skipped" and "unknown target 'npu_not_here'" in skipped.note
    assert skipped.latency is None and skipped.metrics == {}
    assert "elsewhere: skipped: unknown target 'npu_not_here'" in render_text(report)


def test_bundle_of_another_model_is_refused(ee, moe):
    with pytest.raises(CompareError, match=r"bundle .*ee-int8 was exported from early_exit.pt .* not from .*moe.pt"):
        compare(moe[0], [ee[1]], CompareConfig(data="digits"))


def test_bad_data_is_one_line(moe, tmp_path):
    model, bundle = moe
    with pytest.raises(DataError, match="no_such_set is neither a built-in dataset"):
        compare(model, [bundle], CompareConfig(data="no_such_set"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 63), np.float32))
    with pytest.raises(DataError, match=r"input 'x' has shape \(4, 63\), the model expects \(N, 64\)") as e:
        compare(model, [bundle], CompareConfig(data=str(bad)))
    assert "\n" not in str(e.value) and isinstance(e.value, EdgegateError)
    with pytest.raises(CompareError, match="--baseline 'best' is unknown"):
        CompareConfig(data="digits", baseline="best")
