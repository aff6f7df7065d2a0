"""One sweep cell in this process (what a Ray worker runs): an attempt killed mid-write leaves a temp dir,
the next attempt removes it and writes a whole bundle; a node with another edgegate refuses the cell."""

from __future__ import annotations

import hashlib
from pathlib import Path

import edgegate
from edgegate.bundle import read_bundle
from edgegate.sweep import expand, load_spec
from edgegate.sweep.cell import CellJob, run_cell
from edgegate.sweep.store import cell_dir, hash_files, key_of
from tests.sweep._sweep import write_spec


def _job(tmp_path: Path, models: Path, version: str = edgegate.__version__) -> tuple[CellJob, bytes]:
    spec = load_spec(write_spec(tmp_path, models, 'models = ["MODELS/tg.pt"]\n[bench]\nruns = 5\nwarmup = 1'))
    cell = expand(spec)[0]
    shas = hash_files(spec)
    data = cell.model.read_bytes()
    job = CellJob(cell=cell, key=key_of(cell, spec, shas), out=str(tmp_path / "out"),
                  inputs=((str(cell.model), hashlib.sha256(data).hexdigest()),), bench=spec.bench,
                  compare=spec.compare, version=version)
    return job, data


def test_retry_removes_a_killed_attempts_temp_dir(sweep_models: Path, tmp_path: Path) -> None:
    job, data = _job(tmp_path, sweep_models)
    cdir = cell_dir(Path(job.out), job.key)
    # What write_bundle leaves when its process is killed before the rename: a half-filled temp dir.
    half = cdir / ".bundle.k1ll3d.tmp"
    half.mkdir(parents=True)
    (half / "model.onnx").write_bytes(b"\x08\x07 half a model")
    row = run_cell(job, data)  # the bytes travel with the job: this "node" has no copy of the model yet
    assert row["status"] == "ok", row
    assert sorted(p.name for p in cdir.iterdir()) == ["bundle"]  # temp dir gone; row.json is the driver's
    bundle = read_bundle(Path(job.out) / row["bundle"])
    assert bundle.manifest["source"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert bundle.manifest["source"]["file"] == "tg.pt"
    assert (Path(job.out) / "files" / hashlib.sha256(data).hexdigest()[:16] / "tg.pt").read_bytes() == data
    assert row["latency"]["median_ms"] > 0 and 0.9 <= row["metrics"]["accuracy"] <= 1.0
    assert row["bundle_bytes"] == sum(p.stat().st_size for p in bundle.path.iterdir())


def test_a_node_with_another_edgegate_refuses_the_cell(sweep_models: Path, tmp_path: Path) -> None:
    job, data = _job(tmp_path, sweep_models, version="9.9.9")
    row = run_cell(job, data)
    assert row["status"] == "error" and row["bundle"] is None
    assert row["error"] == (f"this node runs edgegate {edgegate.__version__}, the driver 9.9.9; install the same "
                            "version on every node")
    assert not list(Path(job.out).rglob("bundle"))  # refused before any work
