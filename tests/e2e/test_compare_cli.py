"""`edgegate compare` as a user runs it: table on stdout, JSON and HTML (+ PNGs) files, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from edgegate import zoo
from edgegate.loading import save
from edgegate.pipeline import ExportConfig, run_export
from tests._cli import edgegate
from tests._report import PNG_MAGIC, page_images


@pytest.fixture(scope="module")
def work(zoo_model, tmp_path_factory) -> Path:
    """model.pt (the zoo channel_gate CNN) and its int8 cpu bundle."""
    work = tmp_path_factory.mktemp("compare")
    model, metrics = zoo_model("channel_gate")
    save(model, work / "model.pt", meta=zoo.checkpoint_meta("channel_gate", metrics, 0))
    run_export(work / "model.pt", work / "int8.edgegate", ExportConfig(quant="int8"))
    return work


def test_compare_writes_table_json_and_html(work: Path) -> None:
    r = edgegate("compare", "model.pt", "int8.edgegate", "--data", "digits", "--runs", "20", "--warmup", "2",
                 "--json", "report.json", "--html", "out/report.html", cwd=work)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "=== edgegate compare: model.pt on digits (test, 270 samples) ==="
    assert lines[1].split()[:5] == ["model", "target", "quant", "acc", "loss"] and "mask Ham*" in lines[1]
    assert lines[3].split()[:3] == ["float", "torch", "fp32"] and lines[4].split()[:3] == ["int8.edgegate", "cpu",
                                                                                         "int8"]
    assert "* recorded at export on held-out data (manifest quant.fidelity)" in r.stdout
    report = json.loads((work / "report.json").read_text())
    assert (report["format"], report["version"]) == ("edgegate.compare", 4)
    bundle = report["rows"][1]
    assert 0 <= bundle["recorded"]["mask_hamming"] < 0.2  # channel gates: the mask flip rate recorded at export
    assert {"conv1", "conv2", "conv3", "head"} <= set(bundle["layer_sqnr_db"])
    assert bundle["sweep"] == []  # no early exit, no sweep
    page = work / "out" / "report.html"
    assert r.stdout.strip().endswith(f"wrote {Path('out/report.html')}")
    images = page_images(page)
    assert len(images) == 2  # per-layer SQNR and latency (no exits: no sweep plot)
    for png in images:
        assert png.startswith(PNG_MAGIC) and len(png) > 1000
    if shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome"):
        browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        shot = work / "out" / "shot.png"
        subprocess.run([browser, "--headless", "--no-sandbox", f"--screenshot={shot}", page.as_uri()],
                       capture_output=True, timeout=120)
        assert shot.stat().st_size > 1000


@pytest.mark.parametrize(("args", "message"), [
    (["--data", "nope"], "edgegate: error: data nope is neither a built-in dataset"),
    (["--data", "clusters"], "edgegate: error: built-in dataset clusters has samples of shape [16], which cannot be "
                             "reshaped to the model input 'x' of shape [1, 8, 8]"),
])
def test_bad_data_is_one_line_exit_2(work: Path, args: list[str], message: str) -> None:
    r = edgegate("compare", "model.pt", "int8.edgegate", *args, cwd=work)
    assert r.returncode == 2 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr
