"""The CLI as a user runs it: README's main job, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from edgegate import zoo
from edgegate.loading import save
from tests._cli import edgegate


@pytest.fixture(scope="module")
def trained(early_exit_model, tmp_path_factory) -> Path:
    """A folder holding the README's `edgegate zoo train early_exit -o model.pt` (conftest trains it once)."""
    work = tmp_path_factory.mktemp("cli")
    shutil.copy(early_exit_model, work / "model.pt")
    return work


def test_readme_main_job_export_inspect_bench(trained):
    work = trained
    r = edgegate("export", "model.pt", "--target", "cpu", "-o", "model.edgegate", cwd=work)
    assert r.returncode == 0, r.stderr
    bundle = work / "model.edgegate"
    assert sorted(p.name for p in bundle.iterdir()) == ["golden_io.npz", "manifest.json", "model.onnx"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["target"] == "cpu" and manifest["gates"]["gates"][0]["kind"] == "exit"
    assert manifest["export"]["functions"] == ["ExitDecision"]
    assert manifest["golden"]["vs_torch"]["logits_max_abs_err"] < 1e-4
    assert manifest["golden"]["vs_torch"]["exit_index_agreement"] == 1.0

    r = edgegate("inspect", "model.edgegate", "--json", cwd=work)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["onnx"]["op_counts"]["edgegate::ExitDecision"] == 2

    r = edgegate("bench", "model.edgegate", "--runs", "30", "--warmup", "3", "--json", "bench.json", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "Golden check : passed" in r.stdout
    report = json.loads((work / "bench.json").read_text())
    assert report["format"] == "edgegate.bench" and report["runs"] == 30


def test_batch1_if_export(trained):
    r = edgegate("export", "model.pt", "--batch", "1", "--exit-form", "if", "-o", "if.edgegate", cwd=trained)
    assert r.returncode == 0, r.stderr
    info = json.loads(edgegate("inspect", "if.edgegate", "--json", cwd=trained).stdout)
    assert info["onnx"]["op_counts"]["If"] == 2


def _assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("edgegate: error: ") and "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0]


def test_full_pickle_is_refused_without_trust(tmp_path):
    model = zoo.build("threshold_gate")
    torch.save(model, tmp_path / "pickled.pt")  # a full pickle: loading it runs code
    r = edgegate("export", "pickled.pt", "-o", "out.edgegate", cwd=tmp_path)
    _assert_one_line_error(r, "pickled.pt", "--trust-model")
    assert not (tmp_path / "out.edgegate").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pickled.pt"]


def test_existing_bundle_unknown_target_and_corrupt_file(trained, tmp_path):
    r = edgegate("export", "model.pt", "--target", "nosuch", "-o", "x.edgegate", cwd=trained)
    _assert_one_line_error(r, "nosuch", "cpu")
    (tmp_path / "exists.edgegate").mkdir()
    save(zoo.build("threshold_gate"), tmp_path / "m.pt", meta=zoo.checkpoint_meta("threshold_gate", {}, 0))
    r = edgegate("export", "m.pt", "-o", "exists.edgegate", cwd=tmp_path)
    _assert_one_line_error(r, "exists.edgegate", "already exists", "not an edgegate bundle")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "m.pt").read_bytes()[:300])
    r = edgegate("export", "trunc.pt", cwd=tmp_path)
    _assert_one_line_error(r, "trunc.pt")
    assert not (tmp_path / "trunc.edgegate").exists()


def test_debug_shows_traceback(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a model at all")
    r = edgegate("--debug", "inspect", "junk.pt", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_targets_lists_cpu(tmp_path):
    r = edgegate("targets", cwd=tmp_path)
    assert r.returncode == 0 and "cpu" in r.stdout and "yes" in r.stdout


def test_int8_export_records_calibration_and_fidelity(int8_export):
    trained = int8_export.cwd  # `edgegate export model.pt --quant int8 --calib clusters -o int8.edgegate`
    m = json.loads((trained / "int8.edgegate" / "manifest.json").read_text())
    q = m["quant"]
    assert q["scheme"] == "int8" and q["calibration_data"] == "clusters"
    assert q["config"]["calibration"] == "gate_aware" and q["config"]["gate_precision"] == "float"
    assert q["plan"]["layers"] and q["float_layers"]  # stages quantized, exit heads kept float
    # val + 424 train rows calibrate; the target holds on the 2 976 held-out rows (test + the rest of train).
    assert q["data_split"] == {"calibration": {"rows": 1024, "splits": {"val": 600, "train": 424}},
                               "held_out": {"rows": 2976, "splits": {"test": 600, "train": 2376}}}
    fid = q["fidelity"]
    assert fid["summary"]["exit_agreement"] >= 0.995 and fid["samples"] == 2976 and fid["trained_rows"] == 2376
    assert fid["intervals"]["exit_agreement"]["rows"] == 2976 and fid["accuracy"]["samples"] == 600
    info = json.loads(edgegate("inspect", "int8.edgegate", "--json", cwd=trained).stdout)
    # The stages in front of the exits decide them: the search met the target by keeping them float (on cpu the
    # cheaper promotion: a float Linear outruns its A16W8 form); every try it made is recorded, the last chosen.
    search = q["search"]
    assert search["met"] and search["target"] == 0.995 and search["chosen"]["try"] == len(search["tries"]) - 1
    promoted = search["chosen"]["float_layers"]
    assert promoted and set(promoted) <= set(q["float_layers"]) - {"heads.0", "heads.1", "heads.2"}
    assert q["a16"] is None and search["chosen"]["a16_layers"] == [] and q["warnings"] == []
    ops = info["onnx"]["op_counts"]
    assert ops["QuantizeLinear"] >= sum(v["act_bits"] == 8 for v in q["plan"]["layers"].values()) >= 1
    r = edgegate("bench", "int8.edgegate", "--runs", "20", "--warmup", "2", cwd=trained)
    assert r.returncode == 0 and "Golden check : passed" in r.stdout


def test_ternary_export_with_lowrank(tmp_path):
    r = edgegate("zoo", "train", "float_lm", "-o", "lm.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = edgegate("export", "lm.pt", "--quant", "ternary", "--lowrank", "8", "-o", "lm.edgegate", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    q = json.loads((tmp_path / "lm.edgegate" / "manifest.json").read_text())["quant"]
    assert q["scheme"] == "ternary" and q["lowrank"] == 8 and q["bits_per_weight"] <= 2.2
    assert set(q["layers"]) == {"fc1", "fc2", "head"}


def test_bad_quant_options_are_one_line_errors(trained):
    r = edgegate("export", "model.pt", "--quant", "int8", "--lowrank", "4", "-o", "x.edgegate", cwd=trained)
    _assert_one_line_error(r, "--lowrank", "ternary")
    r = edgegate("export", "model.pt", "--quant", "int8", "--calib", "nosuch.npz", "-o", "x.edgegate", cwd=trained)
    _assert_one_line_error(r, "nosuch.npz")
    assert not (trained / "x.edgegate").exists()
