"""The benchmarks package at smoke size: every section runs and reports its fields (no timed assertions).

Ratios are reported, not asserted: these tests check that each figure was measured (positive
times, a ratio per configuration, goals with met/missed), that correctness checks hold (spike
trains, ternary output vs the numpy reference, forced exits) and that bad input gives one line.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("onnxruntime.quantization")

from benchmarks import __main__ as cli  # noqa: E402
from benchmarks.harness import Sizes, crashing, machine_info, time_interleaved  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    """One smoke run of every section, written through the CLI (results.json + results.md)."""
    out = tmp_path_factory.mktemp("bench") / "results.json"
    rc = cli.main(["--smoke", "--out", str(out)])
    doc = json.loads(out.read_text())
    doc["_rc"], doc["_md"] = rc, out.with_suffix(".md").read_text()
    return doc


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_document_and_machine(smoke):
    assert smoke["_rc"] == 0, [s.get("error") for s in smoke["sections"].values()]
    assert smoke["format"] == "edgegate.benchmarks" and smoke["size"] == "smoke"
    assert list(smoke["sections"]) == list(cli.SECTIONS)
    assert all(s["status"] == "ok" for s in smoke["sections"].values())
    m = smoke["machine"]
    assert m["cpus_usable"] >= 1 and "avx512_vnni" in m["cpu_flags"]
    assert m["versions"]["onnxruntime"] and m["versions"]["numpy"] and m["versions"]["torch"]
    assert smoke["sizes"]["repeats"] >= 5
    for g in smoke["goals"]:
        assert g["met"] in (True, False) and g["value"] is not None, g
    for title in ("CPU INT8", "Early exit", "Ternary", "SNN", "Export wall time", "Real-size", "Goals"):
        assert title in smoke["_md"]


def test_cpu_int8(smoke):
    s = smoke["sections"]["cpu_int8"]
    assert not s["errors"] and {m["model"] for m in s["models"]} == {"early_exit", "resnet_digits"}
    for m in s["models"]:
        assert {(r["threads"], r["batch"]) for r in m["latency"]} == {(1, 1), (1, 32), (2, 1), (2, 32)}
        for r in m["latency"]:
            assert all(_positive(r[k]) for k in ("fp32_ms", "edgegate_ms", "ort_static_ms", "speedup_vs_fp32",
                                                  "speedup_vs_ort_static"))
            assert r["speedup_vs_fp32"] == pytest.approx(r["fp32_ms"] / r["edgegate_ms"], rel=0.01)
            assert all(t["repeats"] >= 5 for t in r["timings"].values())
        q = m["quality"]
        assert q["fp32"]["top1_agreement"] == 1.0
        for k in ("edgegate", "ort_static"):
            assert 0.0 <= q[k]["top1_agreement"] <= 1.0 and 0.0 <= q[k]["accuracy"] <= 1.0
    exit_row = next(m for m in s["models"] if m["model"] == "early_exit")
    assert 0.0 <= exit_row["quality"]["edgegate"]["exit_agreement"] <= 1.0


def test_early_exit(smoke):
    s = smoke["sections"]["early_exit"]
    assert not s["errors"] and {m["form"] for m in s["models"]} == {"if", "compaction"}
    for m in s["models"]:
        assert sum(m["exit_fractions"]) == pytest.approx(1.0, abs=1e-3)
        assert len(m["cost_ms_per_sample"]) == len(m["exit_fractions"]) == 3
        ideal = sum(p * c for p, c in zip(m["exit_fractions"], m["cost_ms_per_sample"], strict=True))
        assert m["ideal_ms_per_sample"] == pytest.approx(ideal, rel=0.01, abs=1e-5)
        assert _positive(m["measured_over_ideal"]) and _positive(m["speedup_vs_full_depth"])


def test_gated_families(smoke):
    s = smoke["sections"]["gated_families"]
    assert not s["errors"] and [m["family"] for m in s["models"]] == ["acm", "modes"]
    acm, modes = s["models"]
    assert sum(acm["k_histogram"]) == pytest.approx(1.0, abs=1e-3)
    used = sum(k * p for k, p in enumerate(acm["k_histogram"])) / (len(acm["k_histogram"]) - 1)
    assert acm["used_fraction"] == pytest.approx(used, abs=1e-3) and 0.2 < used < 0.9  # learners really vary
    assert 0.6 < modes["used_fraction"] < 0.8 and modes["tau"] > 0  # ~30% of routed slots skipped
    for m in s["models"]:
        assert m["batch"] == 64 and set(m["timings"]) == {"measured", "ideal", "dense" if m is acm else "no_skip"}
        assert m["measured_over_ideal"] == pytest.approx(m["measured_ms"] / m["ideal_ms"], rel=0.01)
        assert _positive(m["all_over_measured"]) and all(t["repeats"] >= 5 for t in m["timings"].values())
    assert [g["goal"].split(" (")[0] for g in s["goals"]] == ["acm", "modes"]


def test_ternary(smoke):
    s = smoke["sections"]["ternary"]
    assert s["disk"]["bits_per_weight"] < 2.5 and s["disk"]["fp32_bits_per_weight"] >= 32
    assert s["correctness"]["max_err_output_steps"] < 0.5  # integer-exact up to float rounding of the output
    assert {(r["threads"], r["batch"]) for r in s["rows"]} == {(1, 1), (1, 8), (2, 1), (2, 8)}
    assert all(_positive(r["speedup_vs_ort_fp32"]) and _positive(r["speedup_vs_torch_fp32"]) for r in s["rows"])


def test_snn(smoke):
    s = smoke["sections"]["snn"]
    assert not s.get("gap") and not s["errors"] and len(s["rows"]) == 2
    for r in s["rows"]:
        assert r["spikes_equal"] and r["spike_mismatch_fraction"] == 0 and r["output_counts_equal"]
        assert r["total_spikes"] > 0 and _positive(r["speedup"])


def test_export_time(smoke):
    s = smoke["sections"]["export_time"]
    (row,) = s["models"]
    assert row["model"] == "early_exit" and _positive(row["wall_s"])
    assert {"calibrate", "export_onnx", "compile", "golden"} <= set(row["steps_s"])
    assert sum(row["steps_s"].values()) <= row["wall_s"] * 1.05


def test_moe(smoke):
    s = smoke["sections"]["moe"]
    assert not s["errors"], s["errors"]
    dec = s["decode"]
    assert dec["experts"] == [8, 2] and [r["quant"] for r in dec["latency"]] == ["fp32", "int8"]
    for r in dec["latency"]:
        assert r["decode_ratio"] == pytest.approx(r["e8_1_token_ms"] / r["e2_1_token_ms"], rel=0.01)
        assert r["bundle_vs_bare"] == pytest.approx(r["e8_64_tokens_ms"] / r["bare_64_tokens_ms"], rel=0.01)
        # The memory floor beside them: reading the routed experts' weights alone, E=8 against E=2.
        assert _positive(r["read8_1_token_ms"]) and _positive(r["read2_1_token_ms"])
        read = {e: r["timings"]["1"][f"read{e}"]["median_ms"] for e in (8, 2)}  # µs-scale: the unrounded medians
        assert r["weight_read_ratio"] == pytest.approx(read[8] / read[2], rel=0.01)
    # The sparse bundles compute what the float model does and route as it does.
    q = dec["quality"]
    assert q["e8_fp32"]["sqnr_db_vs_float"] > 80 and q["e8_fp32"]["route_set_agreement"] == 1.0
    assert q["e8_int8"]["sqnr_db_vs_float"] > 10 and q["bare8_int8"]["sqnr_db_vs_float"] > 10
    (lm,) = s["memory"]["exports"]
    assert lm["quant"] == "fp32" and lm["peak_rss_mib"] is None and _positive(lm["wall_s"])
    assert len([g for g in s["goals"] if "1 token" in g["goal"]]) == 2


def test_force_exit_changes_only_thresholds():
    """The forced-exit copies differ from the natural graph in the threshold constants alone."""
    import onnx
    from onnx import helper, numpy_helper

    from benchmarks.early_exit import force_exit

    dec = helper.make_node("ExitDecision", ["x", "thr"], ["y"], domain="edgegate")
    graph = helper.make_graph([dec], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.BOOL, [])],
                              [numpy_helper.from_array(np.array(0.9, np.float32), "thr")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("edgegate", 1)])
    for exit_at, want in ((0, 0.0), (1, 2.0)):
        forced = onnx.load_from_string(force_exit(model.SerializeToString(), exit_at))
        assert float(numpy_helper.to_array(forced.graph.initializer[0])) == want
        assert [n.op_type for n in forced.graph.node] == ["ExitDecision"]
    with pytest.raises(ValueError, match="2 exits"):
        force_exit(model.SerializeToString(), 2)


def test_unknown_section_is_one_line(capsys):
    assert cli.main(["--only", "cpu_int8,warp_drive"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'warp_drive'" in err and "cpu_int8" in err


def test_time_interleaved_counts_repeats():
    calls = {"a": 0, "b": 0}

    def bump(k):
        return lambda: calls.__setitem__(k, calls[k] + 1)

    t = time_interleaved({"a": bump("a"), "b": bump("b")}, Sizes(smoke=True, repeats=5, inner=3, warmup=1), inner=3)
    assert calls == {"a": 1 + 5 * 3, "b": 1 + 5 * 3}
    assert t["a"].repeats == 5 and t["a"].inner == 3 and t["a"].min_ms <= t["a"].median_ms <= t["a"].max_ms


def test_crashing_names_the_session_that_dies_and_probes_the_rest():
    """A session that fails in the child is named; the sessions after it are still probed, the good ones pass."""
    from onnx import TensorProto, helper

    def model(op: str) -> bytes:
        shape = helper.make_tensor("shape", TensorProto.INT64, [2], [3, 5])  # 4 values cannot be 3 x 5
        nodes = [helper.make_node("Relu", ["x"], ["y"])] if op == "Relu" else [
            helper.make_node("Reshape", ["x", "shape"], ["y"])]
        graph = helper.make_graph(nodes, op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [shape] if op != "Relu" else [])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()

    feeds = [np.ones((1, 4), np.float32)]
    got = crashing({"first": model("Relu"), "bad": model("Reshape"), "last": model("Relu")}, 1, "x", feeds)
    assert list(got) == ["bad"] and "at 1 thread(s)" in got["bad"], got
    assert crashing({"only": model("Relu")}, 2, "x", feeds) == {}


def test_machine_info_fields():
    m = machine_info()
    assert m["logical_cpus"] >= 1 and isinstance(m["cpu_flags"], dict) and m["versions"]["python"]


def test_compare_gate_kinds():
    """Agreement per gate kind, on arrays whose disagreements are known."""
    from benchmarks.agreement import compare

    ref = {"logits": np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]]),
           "exit_index": np.array([0, 1, 2, 2]), "taus": {"ThresholdGate#0": np.float32(0.5)},
           "gates": {"TopKGate#0": ("route", np.array([[0, 1], [2, 3], [1, 0], [3, 2]])),
                     "ChannelGate#0": ("mask_logits", np.array([1.0, -1.0, 2.0, -2.0])),
                     "ThresholdGate#0": ("threshold", np.array([0.4, 0.6, 0.7, 0.1])),
                     "SigmoidGate#0": ("soft", np.zeros(4))}}
    got = {"logits": np.array([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 2.0]]),
           "exit_index": np.array([0, 1, 1, 2]),
           "gates": {"TopKGate#0": ("route", np.array([[0, 1], [3, 2], [0, 1], [3, 1]])),
                     "ChannelGate#0": ("mask_logits", np.array([1.0, 1.0, 2.0, -2.0])),
                     "ThresholdGate#0": ("threshold", np.array([0.4, 0.6, 0.4, 0.1]))}}
    out = compare(ref, got, labels=np.array([0, 1, 0, 1]))
    assert out["accuracy"] == 0.75 and out["top1_agreement"] == 0.75 and out["exit_agreement"] == 0.75
    g = out["gates"]
    assert g["TopKGate#0.top1"] == 0.5  # rows 0 and 3 keep their first expert
    assert g["TopKGate#0.topk_set"] == 0.75  # the set ignores order; row 3 swaps expert 2 for 1
    assert g["ChannelGate#0.mask"] == 0.75 and g["ThresholdGate#0.mask"] == 0.75
    assert "SigmoidGate#0.soft_mae" not in g  # missing in the quantized model: not reported
    assert out["gate_agreement"] == pytest.approx(np.mean([0.5, 0.75, 0.75, 0.75, 0.75]), abs=1e-4)


def test_load_note_only_under_load():
    from benchmarks.report import _load_note

    quiet = {"cpus_usable": 2, "load_average_1_5_15": [0.5, 0.4, 0.3], "load_average_end": [1.2, 0.5, 0.3]}
    busy = {**quiet, "load_average_end": [6.5, 5.0, 4.0]}
    assert _load_note(quiet) == [] and "under load" in _load_note(busy)[0] and "6.5" in _load_note(busy)[0]


def test_real_size(smoke):
    s = smoke["sections"]["real_size"]
    assert not s["errors"] and [m["model"] for m in s["models"]] == ["resnet18"] and s["input_size"] == 32
    (m,) = s["models"]
    assert {r["batch"] for r in m["latency"]} == {1, 4} and m["parameters"] > 0
    for r in m["latency"]:
        assert all(_positive(r[k]) for k in ("fp32_ms", "edgegate_ms", "ort_static_ms", "speedup_vs_fp32"))
        assert r["speedup_vs_fp32"] == pytest.approx(r["fp32_ms"] / r["edgegate_ms"], rel=0.01)
    for k in ("edgegate", "ort_static"):
        assert math.isfinite(m["quality"][k]["sqnr_db"]) and 0.0 <= m["quality"][k]["top1_agreement"] <= 1.0
    assert _positive(m["export"]["int8"]["wall_s"]) and "calibrate" in m["export"]["int8"]["steps_s"]
    decisions = m["latency_aware"]["regions"]  # the cpu target recorded a measured decision per region
    assert decisions and all(d["kept"] in ("int8", "float") for d in decisions)
    names = {g["goal"] for g in s["goals"]}
    assert "resnet18: INT8 >= 3x FP32 (batch 1, 1 thread)" in names and any("batch 4" in n for n in names)
    (g,) = s["gated"]  # the smoke-size early-exit MLP: exits fire on some rows, fp32 and int8 through the CLI
    assert g["model"] == "early_exit_mlp" and 0.0 < g["test_exit_shares_fp32"][-1] < 1.0
    r = g["latency"]
    assert r["batch"] == 1 and all(_positive(r[k]) for k in ("fp32_ms", "edgegate_ms", "ort_static_ms"))
    assert all(0.0 <= g["quality"][k]["exit_agreement"] <= 1.0 for k in ("edgegate", "ort_static"))
    assert _positive(g["export"]["int8"]["wall_s"]) and "calibrate" in g["export"]["int8"]["steps_s"]
    assert any(n.startswith("early_exit_mlp") for n in names) and "gated model" in smoke["_md"]
    e = smoke["sections"]["snn"]["energy"]
    assert e["default"]["energy_pj_per_sample"] > 0 and e["ann_energy_pj_per_sample"] > 0
