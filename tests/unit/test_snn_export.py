"""`edgegate export --target snn` and `edgegate bench` as a user runs them: the bundle's files, its
manifest, golden outputs from the emulator, the bench's runtime metrics, and a one-line refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgegate import zoo
from edgegate.loading import save
from tests._cli import edgegate


@pytest.fixture(scope="module")
def work(tmp_path_factory, zoo_model) -> Path:
    path = tmp_path_factory.mktemp("snn")
    model, metrics = zoo_model("threshold_gate")
    save(model, path / "model.pt", meta=zoo.checkpoint_meta("threshold_gate", metrics, 0))
    return path


def test_export_ternary_bundle_and_bench(work):
    r = edgegate("export", "model.pt", "--target", "snn", "--quant", "ternary", "-O", "timesteps=32",
                 "-O", "early_decision=on", "-o", "snn.edgegate", cwd=work)
    assert r.returncode == 0, r.stderr
    bundle = work / "snn.edgegate"
    assert sorted(p.name for p in bundle.iterdir()) == ["core.egc", "golden_io.npz", "manifest.json", "model.nir",
                                                        "model.onnx", "stream.bin"]
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["target"] == "snn" and m["golden"]["source"] == "snn"
    assert m["target_options"]["timesteps"] == 32 and m["target_options"]["early_decision"] == "on"
    assert m["golden"]["vs_torch"]["logits_top1_agreement"] >= 0.9
    assert m["export"]["functions"] == ["TernaryMatMul", "ThresholdGate"]
    from edgegate.snn.image import read_image
    from edgegate.snn.network import SynapseFormat

    net = read_image((bundle / "core.egc").read_bytes()).network
    assert [g.fmt for g in net.groups] == [SynapseFormat.TERNARY, SynapseFormat.TERNARY]

    r = edgegate("bench", "snn.edgegate", "--runs", "20", "--warmup", "2", "--json", "bench.json", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "Golden check : passed" in r.stdout
    metrics = json.loads((work / "bench.json").read_text())["runtime_metrics"]
    assert metrics["samples"] == 1 and metrics["timesteps"] == 32
    assert 8 <= metrics["timesteps_to_decision"]["mean"] <= 32
    assert set(metrics["spikes_per_layer"]) == {"input", *(g.name for g in net.groups)}


def test_corrupt_core_image_is_one_line_exit_2(work):
    """Run after the export test (same module): a copy of its bundle with one byte of core.egc flipped."""
    src = work / "snn.edgegate"
    if not src.exists():
        pytest.skip("needs the bundle of test_export_ternary_bundle_and_bench")
    bad = work / "bad.edgegate"
    shutil.copytree(src, bad)
    data = bytearray((bad / "core.egc").read_bytes())
    data[100] ^= 0xFF
    (bad / "core.egc").write_bytes(bytes(data))
    r = edgegate("bench", "bad.edgegate", cwd=work)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "core.egc" in r.stderr  # the bundle's sha256 check names the file before the image is parsed
