"""`edgegate sweep` on a local Ray started for the run: 2 zoo models x fp32/int8, every row ok, sweep.json,
report.html with its Pareto PNGs; a re-run recomputes nothing (and starts no Ray)."""

from __future__ import annotations

import json
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest

from edgegate.bundle import read_bundle
from tests._report import PNG_MAGIC, page_images
from tests.sweep._sweep import run, write_spec

SPEC = """
models = ["MODELS/tg.pt", "MODELS/ee.pt"]
quant = ["fp32", "int8"]

[bench]
runs = 30
warmup = 3

[compare]
max_samples = 300
"""


@pytest.fixture(scope="module")
def local_sweep(sweep_models: Path, ray_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("sweep-local")
    write_spec(work, sweep_models, SPEC)
    r = run(["sweep", "spec.toml", "-o", "out", "--num-cpus", "2"], work, ray_env)
    assert r.returncode == 0, r.stderr[-3000:]
    return work, r


class _Table(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_local_sweep_rows_report_and_bundles(local_sweep) -> None:
    work, r = local_sweep
    out = work / "out"
    sweep = json.loads((out / "sweep.json").read_text())
    assert (sweep["format"], sweep["version"], sweep["status"]) == ("edgegate.sweep", 1, "complete")
    assert sweep["summary"] == {"cells": 4, "ok": 4, "error": 0, "pending": 0, "cached": 0}
    assert sweep["ray"]["address"] == "local" and sweep["ray"]["nodes"] == 1 and sweep["ray"]["cpus"] == 2
    assert sweep["spec"]["quant"] == ["fp32", "int8"] and sweep["spec"]["bench"]["runs"] == 30
    assert [row["name"] for row in sweep["rows"]] == [
        "tg/cpu/fp32", "tg/cpu/int8/percentile/gate_aware", "ee/cpu/fp32", "ee/cpu/int8/percentile/gate_aware"]
    for row in sweep["rows"]:
        assert row["status"] == "ok" and row["error"] is None and row["cached"] is False, row
        cell = row["cell"]
        assert cell["target"] == "cpu" and cell["model"] in ("tg.pt", "ee.pt")
        assert (cell["observer"], cell["calibration"]) == (("percentile", "gate_aware") if cell["quant"] == "int8"
                                                           else (None, None))
        assert 0.85 <= row["metrics"]["accuracy"] <= 1.0
        assert abs(row["metrics"]["accuracy"] - row["reference"]["accuracy"]) <= 0.03  # int8 near float
        assert row["data"] == {"name": "digits" if cell["model"] == "tg.pt" else "clusters", "split": "test",
                               "samples": 270 if cell["model"] == "tg.pt" else 300, "labels": True}
        assert 0 < row["latency"]["min_ms"] <= row["latency"]["median_ms"] <= row["latency"]["p99_ms"]
        assert row["throughput"] > 0 and row["batch"] == 1
        assert row["export_s"] > 0 and row["compare_s"] > 0 and row["bench_s"] > 0
        assert set(row["timings_s"]) >= {"load", "export_onnx", "compile", "golden"}
        assert len(row["node"]["id"]) == 56 and row["node"]["pid"] > 0 and row["node"]["ip"]
        bundle = read_bundle(out / row["bundle"])  # verifies every file's sha256
        assert bundle.manifest["quant"]["scheme"] == cell["quant"]
        assert row["bundle_bytes"] == sum(p.stat().st_size for p in (out / row["bundle"]).iterdir())
        assert json.loads((out / row["bundle"]).parent.joinpath("row.json").read_text()) == row
    ee = [row for row in sweep["rows"] if row["cell"]["model"] == "ee.pt"]
    assert all(0.95 <= row["metrics"]["exit_agreement"] <= 1.0 for row in ee)
    assert ee[0]["metrics"]["exit_agreement"] == 1.0  # fp32 takes the float model's exits exactly
    assert list((out / "logs").glob("ray-*/raylet.out"))  # the local Ray's logs, kept with the sweep
    # The terminal gets the table and the summary (no progress bar: stdout is a pipe).
    assert "4 cells: 4 ok, 0 error, 0 from the cache" in r.stdout
    assert "tg/cpu/int8/percentile/gate_aware" in r.stdout and "\r" not in r.stdout

    page = out / "report.html"
    images = page_images(page)
    assert len(images) == 2  # one Pareto figure per model
    for png in images:
        assert png.startswith(PNG_MAGIC)
        width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
        assert width >= 500 and height >= 300
    table = _Table()
    table.feed(page.read_text())
    assert table.rows[0][:4] == ["#", "cell", "status", "accuracy"]
    body = {row[1]: row for row in table.rows[1:]}
    assert set(body) == {row["name"] for row in sweep["rows"]}
    assert all(row[2] == "ok" for row in body.values())
    assert any(row[-1].startswith("*") for row in body.values())  # each model has a front


def test_rerun_recomputes_nothing(local_sweep, ray_env: dict[str, str], sweep_models: Path) -> None:
    work, _ = local_sweep
    out = work / "out"
    before = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/**/*") if p.is_file()}
    r = run(["sweep", "spec.toml", "-o", "out"], work, ray_env)
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["summary"] == {"cells": 4, "ok": 4, "error": 0, "pending": 0, "cached": 4}
    assert sweep["ray"] is None  # every cell came from the cache: no Ray was started
    assert all(row["cached"] for row in sweep["rows"])
    assert "4 cells: 4 ok, 0 error, 4 from the cache" in r.stdout
    # A renamed copy of a model is the same content: its cells come from the cache, under its own name.
    (work / "tg-copy.pt").write_bytes((sweep_models / "tg.pt").read_bytes())
    (work / "more.toml").write_text((work / "spec.toml").read_text().replace("models = [", 'models = ["tg-copy.pt", '))
    r = run(["sweep", "more.toml", "-o", "out"], work, ray_env)
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["summary"] == {"cells": 6, "ok": 6, "error": 0, "pending": 0, "cached": 6}
    assert [row["name"] for row in sweep["rows"][:2]] == ["tg-copy/cpu/fp32", "tg-copy/cpu/int8/percentile/gate_aware"]
    assert sweep["rows"][0]["key"] == sweep["rows"][2]["key"] and sweep["rows"][0]["cell"]["model"] == "tg-copy.pt"
    after = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/**/*") if p.is_file()}
    assert after == before and len(before) == 16  # 4 x (row.json + manifest, model.onnx, golden_io.npz)
    assert len(page_images(out / "report.html")) == 3  # one Pareto figure per model name
