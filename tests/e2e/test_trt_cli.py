"""`edgegate export --target trt` as a user runs it: an int8 early-exit engine (nested If, batch 1),
inspect, targets, and the one-line errors for what cannot happen here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests._cli import edgegate

pytest.importorskip("tensorrt_rtx_bindings", exc_type=ImportError)


@pytest.fixture(scope="module")
def exported(early_exit_model, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("trt-cli")
    shutil.copy(early_exit_model, work / "model.pt")
    r = edgegate("export", "model.pt", "--target", "trt", "-O", "flavor=rtx", "--quant", "int8", "--batch", "1",
                 "-O", "opt_level=0", "-o", "int8.edgegate", cwd=work)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # TensorRT's log stays out of the terminal
    return work


def test_int8_if_engine_bundle(exported):
    bundle = exported / "int8.edgegate"
    assert sorted(p.name for p in bundle.iterdir()) == ["engine.plan", "golden_io.npz", "manifest.json",
                                                       "model.onnx", "network.json"]
    m = json.loads((bundle / "manifest.json").read_text())
    opts = m["target_options"]
    assert m["target"] == "trt" and m["export"]["batch"] == 1  # --exit-form auto: nested If for batch 1
    assert opts["flavor"] == "rtx" and opts["precision"] == "int8" and opts["build"]["profiles"] == []
    assert opts["build"]["engine_sha256"] == m["files"]["engine.plan"]["sha256"]
    assert opts["build"]["layer_precisions"].get("QUANTIZE:INT8", 0) >= 1
    assert opts["build"]["plugins"] == {"ExitDecision": "inlined"}
    assert m["golden"]["source"] in ("onnxruntime", "trt")

    r = edgegate("inspect", "int8.edgegate", "--json", cwd=exported)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["onnx"]["op_counts"]["If"] >= 1
    engine = info["engine"]
    assert engine["flavor"] == "rtx" and engine["layers"]
    kinds = {layer.get("type") or layer.get("LayerType") for layer in engine["layers"]}
    assert "CONDITION" in kinds or engine["source"] == "engine inspector"  # the If became a conditional

    # The summary names the engine; its layer table (one row per layer) only with --layers.
    r = edgegate("inspect", "int8.edgegate", cwd=exported)
    assert r.returncode == 0, r.stderr
    n = len(engine["layers"])
    assert any(line.startswith("Engine       : rtx ") and f"{n} layers" in line for line in r.stdout.splitlines())
    assert "edgegate inspect --layers lists them" in r.stdout and "CONDITIONAL_INPUT" not in r.stdout
    r = edgegate("inspect", "int8.edgegate", "--layers", cwd=exported)
    lines = r.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["layer", "type", "outputs"])
    assert len(lines) - header - 2 == n  # the last table: one row per layer under the header and its rule


def test_targets_says_whether_trt_builds_and_runs_here(exported):
    r = edgegate("targets", cwd=exported)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("trt "))
    assert row.split()[1] == "yes"  # builds: TensorRT-RTX is installed


def test_engine_checks_are_one_line_errors(exported, tmp_path):
    from edgegate import targets

    if not targets.can_run(targets.get("trt"))[0]:
        r = edgegate("bench", "int8.edgegate", "--runs", "3", cwd=exported)
        assert r.returncode == 2 and r.stderr.count("\n") == 1
        assert "cannot run" in r.stderr and "NVIDIA" in r.stderr
    r = edgegate("inspect", str(exported / "int8.edgegate" / "engine.plan"), cwd=exported)
    assert r.returncode == 2 and "--trust-model" in r.stderr and r.stderr.count("\n") == 1


def test_fp16_and_unknown_option(exported):
    r = edgegate("export", "model.pt", "--target", "trt", "--quant", "fp16", "-O", "opt_level=0",
                 "-o", "fp16.edgegate", cwd=exported)
    assert r.returncode == 0, r.stderr
    m = json.loads((exported / "fp16.edgegate" / "manifest.json").read_text())
    assert m["target_options"]["fp16"] and m["target_options"]["build"]["profiles"][0]["max"] == [64, 16]
    assert any(k.endswith(":HALF") for k in m["target_options"]["build"]["layer_precisions"])
    r = edgegate("export", "model.pt", "--target", "trt", "-O", "speed=max", "-o", "x.edgegate", cwd=exported)
    assert r.returncode == 2 and "unknown trt option 'speed'" in r.stderr
