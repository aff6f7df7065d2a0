"""edgegate.benchmark: golden check, timed runs, statistics, histograms and the JSON report.

Bundles are built here without torch: an ONNX graph from ``onnx.helper``, compiled by the real
``cpu`` target, golden outputs from onnxruntime, a manifest shaped like pipeline.py's, written by
``write_bundle``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgegate import targets
from edgegate.benchmark import (
    CV_WARN,
    FORMAT,
    ROUTE_NOTE,
    BenchConfig,
    BenchError,
    BenchReport,
    bench,
    summarize_latencies,
)
from edgegate.bundle import read_bundle, sha256_file
from edgegate.bundle_write import write_bundle
from edgegate.errors import BundleError, EdgegateError, TargetError
from edgegate.reports.bench_text import render_text
from edgegate.targets.cpu import CpuTarget

W = np.array(
    [[1.0, -1.0, 0.5], [0.5, 2.0, -1.0], [-1.0, 0.5, 2.0], [0.25, -0.5, 1.0]], dtype=np.float32
)  # 4 features -> 3 classes
SAMPLES = 8


def _model(batch: int | None, *, exits: bool = False, route: str | None = None) -> onnx.ModelProto:
    """logits = Relu(x @ W); optional int64 outputs: exit_index = argmax(logits), `route` = top-2."""
    dim: int | str = batch if batch is not None else "N"
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["logits"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [dim, 3])]
    if exits:  # a stand-in for an early-exit decision: data-dependent, one int64 per sample
        nodes.append(helper.make_node("ArgMax", ["h"], ["exit_index"], axis=1, keepdims=0))
        outputs.append(helper.make_tensor_value_info("exit_index", TensorProto.INT64, [dim]))
    if route:  # top-2 of 3 "experts" per sample
        k = numpy_helper.from_array(np.array([2], dtype=np.int64), "k")
        nodes.append(helper.make_node("TopK", ["h", "k"], ["top_values", route], axis=1))
        outputs.append(helper.make_tensor_value_info(route, TensorProto.INT64, [dim, 2]))
        outputs.append(helper.make_tensor_value_info("top_values", TensorProto.FLOAT, [dim, 2]))
    inits = [numpy_helper.from_array(W, "W")] + ([k] if route else [])
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [dim, 4])], outputs, inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def _make_bundle(
    dest: Path,
    *,
    batch: int | None = None,
    exits: bool = False,
    route: str | None = None,
    router_gate: bool = False,
) -> Path:
    proto = _model(batch, exits=exits, route=route)
    artifact = targets.get("cpu").compile(proto, None, dest.parent)
    x = np.random.default_rng(0).standard_normal((SAMPLES, 4)).astype(np.float32)
    with targets.get("cpu").load(artifact) as runner:
        names = runner.output_names
        step = batch or SAMPLES  # like pipeline._golden: a static batch runs chunk by chunk
        outs = [runner.run({"x": x[i : i + step]}) for i in range(0, SAMPLES, step)]
    golden = {"input.x": x, **{f"output.{n}": np.concatenate([o[n] for o in outs]) for n in names}}
    gates: list[dict[str, Any]] = []
    if exits:
        gates.append({"name": "", "kind": "exit", "module": "EarlyExitNet", "details": {"n_exits": 3}})
    if router_gate:
        gates.append({"name": "moe.router", "kind": "router", "module": "TopKRouter",
                      "details": {"k": 2, "n_experts": 3}})  # fmt: skip
    manifest = {
        "target": "cpu",
        "target_options": artifact.options,
        "source": {"file": "tiny.pt"},
        "gates": {"gates": gates},
        "export": {
            "input": {"name": "x", "shape": [4], "dtype": "float32"},
            "outputs": list(names),
            "batch": batch,
        },  # fmt: skip
        "golden": {"samples": SAMPLES, "atol": 1e-4},
    }
    return write_bundle(dest, {**artifact.files, "golden_io.npz": _npz(golden)}, manifest)


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _rewrite(bundle: Path, name: str, data: bytes, *, fix_sha: bool) -> None:
    """Replace one bundle file; with fix_sha, update manifest.json so verification still passes."""
    (bundle / name).write_bytes(data)
    if fix_sha:
        mpath = bundle / "manifest.json"
        manifest = json.loads(mpath.read_text())
        manifest["files"][name] = {"sha256": sha256_file(bundle / name), "bytes": len(data)}
        mpath.write_text(json.dumps(manifest))


def _golden(bundle: Path) -> dict[str, np.ndarray]:
    with np.load(bundle / "golden_io.npz") as z:
        return {k: z[k] for k in z.files}


QUICK = BenchConfig(runs=40, warmup=3)


# ---------------------------------------------------------------------------------------------- tests


def test_report_fields_statistics_and_throughput(tmp_path: Path) -> None:
    path = _make_bundle(tmp_path / "b")
    report = bench(path, QUICK)
    assert report.bundle == str(path) and report.target == "cpu"
    assert (report.batch, report.runs, report.requested_runs, report.warmup) == (1, 40, 40, 3)
    lat = report.latency
    assert 0 < lat.min_ms <= lat.median_ms <= lat.p90_ms <= lat.p95_ms <= lat.p99_ms <= lat.max_ms
    assert lat.min_ms <= lat.mean_ms <= lat.max_ms
    assert report.throughput == pytest.approx(report.batch / (lat.mean_ms / 1e3))
    assert lat.cv == pytest.approx(lat.std_ms / lat.mean_ms)
    assert report.unstable == (lat.cv > CV_WARN)
    assert report.golden.samples == SAMPLES and report.golden.atol == 1e-4
    assert set(report.golden.max_abs_err) == {"logits"} and report.golden.max_abs_err["logits"] <= 1e-4
    assert report.timed_s >= lat.mean_ms * report.runs / 1e3 * 0.99
    mem = report.memory
    assert mem.peak_rss_before_mib > 0 and mem.peak_rss_after_mib >= mem.peak_rss_before_mib
    assert mem.delta_mib == pytest.approx(mem.peak_rss_after_mib - mem.peak_rss_before_mib, abs=1e-2)
    import onnxruntime

    assert report.host["onnxruntime"] == onnxruntime.__version__
    assert "CPUExecutionProvider" in report.host["providers"] and report.host["cpu_count"] >= 1
    assert report.exits is None and report.routes == ()
    assert report.target_options == read_bundle(path).target_options  # threads=None: as recorded


def test_json_round_trip_is_versioned(tmp_path: Path) -> None:
    report = bench(_make_bundle(tmp_path / "b", exits=True), QUICK)
    d = report.to_dict()
    assert (d["format"], d["version"]) == (FORMAT, 5)
    text = json.dumps(d, allow_nan=False)  # strict JSON: no NaN/Infinity
    assert json.loads(text) == d
    assert set(d) == {"format", "version", *BenchReport.__dataclass_fields__} - {"latencies_ms"}
    assert d["runtime_metrics"] is None  # the cpu runner reports no metrics of its own
    assert set(d["latency"]) == {"min_ms", "mean_ms", "median_ms", "p90_ms", "p95_ms", "p99_ms",
                                 "max_ms", "std_ms", "cv"}  # fmt: skip
    assert d["exits"]["counts"] == list(report.exits.counts)


def test_exit_histogram_counts_every_timed_sample(tmp_path: Path) -> None:
    path = _make_bundle(tmp_path / "b", exits=True)
    # batch 3 over 8 golden samples: the feed cycle is 8 batches long and uses each sample 3 times,
    # so 16 runs feed every golden sample exactly 6 times.
    report = bench(path, BenchConfig(runs=16, warmup=2, batch=3))
    h = report.exits
    assert h is not None and (h.kind, h.gate, h.output) == ("exit", "", "exit_index")
    assert sum(h.counts) == report.runs * report.batch == 48
    expected = np.bincount(_golden(path)["output.exit_index"], minlength=3) * 6
    assert list(h.counts) == expected.tolist()
    assert sum(h.fractions) == pytest.approx(1.0)
    depth = sum((i + 1) * c for i, c in enumerate(h.counts)) / sum(h.counts)
    assert h.mean == pytest.approx(depth)
    assert any("only 16 timed runs" in w for w in report.warnings)  # < 30 runs: noted


def test_route_histogram_from_an_indices_output(tmp_path: Path) -> None:
    report = bench(_make_bundle(tmp_path / "b", route="route_indices", router_gate=True), QUICK)
    (h,) = report.routes
    assert (h.kind, h.gate, h.output) == ("route", "moe.router", "route_indices")
    assert len(h.counts) == 3 and sum(h.counts) == report.runs * report.batch * 2  # top-2
    assert h.mean is None and h.note == ""


def test_router_without_an_indices_output_is_reported_not_faked(tmp_path: Path) -> None:
    report = bench(_make_bundle(tmp_path / "b", router_gate=True), QUICK)
    (h,) = report.routes
    assert h.output is None and h.counts == () and h.fractions == () and h.note == ROUTE_NOTE
    assert ROUTE_NOTE in render_text(report)


def test_static_batch_is_respected(tmp_path: Path) -> None:
    path = _make_bundle(tmp_path / "b", batch=2, exits=True)
    report = bench(path, QUICK)
    assert report.batch == 2 and sum(report.exits.counts) == 2 * report.runs
    assert report.throughput == pytest.approx(2 / (report.latency.mean_ms / 1e3))
    with pytest.raises(BenchError, match="static batch of 2; it cannot run batch 3"):
        bench(path, BenchConfig(runs=5, warmup=0, batch=3))


def test_threads_reach_the_target_options(tmp_path: Path) -> None:
    report = bench(_make_bundle(tmp_path / "b"), BenchConfig(runs=5, warmup=0, threads=1))
    assert report.target_options["intra_op_threads"] == 1
    assert "threads 1" in render_text(report)


def test_progress_and_duration_cap(tmp_path: Path) -> None:
    path = _make_bundle(tmp_path / "b")
    calls: list[tuple[int, int]] = []
    bench(path, BenchConfig(runs=7, warmup=2), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 9) for i in range(1, 10)]
    capped = bench(path, BenchConfig(runs=100_000, warmup=0, max_seconds=1e-9))
    assert capped.runs == 1 and capped.requested_runs == 100_000
    assert any("stopped after 1 of 100000 runs" in w for w in capped.warnings)


def test_tampered_golden_fails_the_golden_check(tmp_path: Path) -> None:
    path = _make_bundle(tmp_path / "b", exits=True)
    golden = _golden(path)
    golden["output.logits"] = golden["output.logits"] + np.float32(0.5)
    _rewrite(path, "golden_io.npz", _npz(golden), fix_sha=True)
    read_bundle(path)  # the bundle itself still verifies
    calls: list[tuple[int, int]] = []
    with pytest.raises(BenchError, match=r"golden check failed: output logits max \|error\| 0\.5") as e:
        bench(path, QUICK, progress=lambda *a: calls.append(a))
    assert calls == []  # checked before any warm-up or timed run
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, EdgegateError)


def test_integer_outputs_must_match_exactly(tmp_path: Path) -> None:
    path = _make_bundle(tmp_path / "b", exits=True)
    golden = _golden(path)
    golden["output.exit_index"] = (golden["output.exit_index"] + 1) % 3  # an atol would hide 1
    _rewrite(path, "golden_io.npz", _npz(golden), fix_sha=True)
    with pytest.raises(BenchError, match="output exit_index .* exact match"):
        bench(path, QUICK)


def test_tampered_model_fails_verification(tmp_path: Path) -> None:
    path = _make_bundle(tmp_path / "b")
    data = bytearray((path / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    _rewrite(path, "model.onnx", bytes(data), fix_sha=False)
    with pytest.raises(BundleError, match="model.onnx does not match its sha256"):
        bench(path, QUICK)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"runs": 0}, "runs=0"), ({"warmup": -1}, "warmup=-1"), ({"batch": 0}, "batch=0"),
     ({"threads": 1.5}, "threads=1.5"), ({"max_seconds": 0}, "max_seconds=0")],
)  # fmt: skip
def test_config_is_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(BenchError, match=message):
        BenchConfig(**kwargs)


def test_summarize_latencies_matches_numpy() -> None:
    ms = [1.0, 2.0, 3.0, 4.0, 100.0]
    s = summarize_latencies(ms)
    assert (s.min_ms, s.median_ms, s.max_ms, s.mean_ms) == (1.0, 3.0, 100.0, 22.0)
    assert s.p90_ms == pytest.approx(61.6) and s.p99_ms == pytest.approx(96.16)  # linear interpolation
    assert s.cv == pytest.approx(np.std(ms) / 22.0) and s.cv > CV_WARN
    assert summarize_latencies([2.0] * 10).cv == 0.0
    with pytest.raises(BenchError, match="no latencies"):
        summarize_latencies([])


def test_render_text_is_a_compact_block(tmp_path: Path) -> None:
    report = bench(_make_bundle(tmp_path / "b", exits=True), QUICK)
    text = render_text(report)
    for label in ("Golden check", "Setup", "Latency (ms)", "Throughput", "Peak RSS", "Exits", "Host"):
        assert label in text
    assert f"p99 {report.latency.p99_ms:.4f}" in text and "mean depth" in text
    assert len(text.splitlines()) <= 12


def test_kept_latencies_are_the_summarized_ones(tmp_path: Path) -> None:
    report = bench(_make_bundle(tmp_path / "b"), QUICK, keep_latencies=True)
    assert len(report.latencies_ms) == report.runs == 40
    assert summarize_latencies(report.latencies_ms) == report.latency
    assert bench(_make_bundle(tmp_path / "c"), QUICK).latencies_ms == ()


class _CountingRunner:
    """A cpu runner that also reports metrics, as a target with its own counters (snn) does."""

    bench_notes: dict[str, str] = {}

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls, self.rows = inner, 0, 0
        self.input_specs, self.output_names = inner.input_specs, inner.output_names
        self.latencies_ms = inner.latencies_ms

    def __enter__(self) -> _CountingRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.close()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        self.rows += len(feeds["x"])
        return self.inner.run(feeds)

    def metrics(self) -> dict[str, Any]:
        return {"runs": self.calls, "samples": np.int64(self.rows), "energy_uj": np.float32(0.5) * self.calls,
                "per_layer": {"fc": np.arange(3), "long": list(range(20))}}


class _CountingTarget(CpuTarget):
    name = "cpu_counting"

    def load(self, bundle_or_artifact: Any) -> _CountingRunner:
        return _CountingRunner(super().load(bundle_or_artifact))


def test_runner_metrics_are_reported(tmp_path: Path) -> None:
    try:
        targets.get(_CountingTarget.name)
    except TargetError:
        targets.register(_CountingTarget())
    path = _make_bundle(tmp_path / "b")
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "target": _CountingTarget.name}))
    report = bench(path, BenchConfig(runs=12, warmup=3))
    m = report.runtime_metrics
    # metrics() is read after the timed runs: one golden call (dynamic batch), the warm-up and the runs.
    assert m == {"runs": 16, "samples": SAMPLES + 15, "energy_uj": 8.0,
                 "per_layer": {"fc": [0, 1, 2], "long": list(range(20))}}
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["version"] == 5 and d["runtime_metrics"] == m
    text = render_text(report)
    assert ("Runtime      : runs 16, samples 23, energy_uj 8, per_layer.fc [0, 1, 2], "
            "per_layer.long sum 190 over 20") in text
