"""One sweep cell, run on whichever node Ray picks: export -> compare -> bench -> one row (a JSON-able dict).

Input: a `CellJob` (the cell, its key, the sweep folder, bench/compare settings, the device agent if
the spec names one) and the bytes of the files it reads (model, .npz data), sent through Ray's object
store so nodes need no shared folder. With a device, the bench runs on the agent (its client uploads
the bundle) and compare's accuracy and fidelity are still measured on this node.
Output: the row (README, "Sweeps"). The bundle is written on this node by the pipeline's
``write_bundle`` (temp dir + rename) under ``DIR/cells/<key>/bundle``; an attempt killed mid-write
leaves only a temp dir, which the next attempt removes first. A cell that fails returns an error
row with the one-line reason; only a dead worker (no row at all) makes Ray retry the cell.

Ray-free: the driver's task wrapper (``runner.py``) adds the node that ran it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import edgegate
from edgegate import targets
from edgegate.benchmark import BenchConfig, BenchReport, bench
from edgegate.bundle import read_bundle
from edgegate.comparison import CompareConfig, compare
from edgegate.device import DeviceClient, DeviceTargetError
from edgegate.errors import EdgegateError, one_line
from edgegate.pipeline import ExportConfig, run_export
from edgegate.reports.stats import THREAD_OPTIONS, plain
from edgegate.sweep import store
from edgegate.sweep.spec import BenchSettings, Cell, CellStatus, CompareSettings, SweepError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class CellJob:
    cell: Cell
    key: str
    out: str  # the sweep folder: the same absolute path on every node
    inputs: tuple[tuple[str, str], ...]  # (absolute source path, sha256) of the files sent with the job
    bench: BenchSettings
    compare: CompareSettings
    version: str  # the driver's edgegate version; a node running another one refuses the cell
    device_url: str | None = None  # bench on this device agent instead of on the node
    device_token: str | None = dataclasses.field(default=None, repr=False)


class _StageError(Exception):
    """An error in one stage of a cell, prefixed with the stage's name for the row."""


def run_cell(job: CellJob, *blobs: bytes) -> dict[str, Any]:
    """Run `job`; `blobs` are the contents of `job.inputs`, in order. Never raises for a cell's own failure."""
    cell, out = job.cell, Path(job.out)
    cdir = store.cell_dir(out, job.key)
    row: dict[str, Any] = {"key": job.key, "name": cell.name, "cell": cell.config(), "status": CellStatus.OK,
                           "error": None, "note": "", "bundle": str(cdir.relative_to(out) / store.BUNDLE),
                           "cached": False}
    try:
        if job.version != edgegate.__version__:
            raise SweepError(f"this node runs edgegate {edgegate.__version__}, the driver {job.version}; "
                             "install the same version on every node")
        removed = store.clean_leftovers(cdir)
        if removed:
            log.info("cell %s: removed leftovers of an interrupted attempt: %s", cell.name, removed)
        local = {src: store.materialise(out, Path(src).name, sha, blob, src)
                 for (src, sha), blob in zip(job.inputs, blobs, strict=True)}
        row.update(_run(job, local))
    except _StageError as e:
        row.update(status=CellStatus.ERROR, error=str(e))
    except EdgegateError as e:
        row.update(status=CellStatus.ERROR, error=one_line(e))
    if row["status"] == CellStatus.ERROR and not (cdir / store.BUNDLE).is_dir():
        row["bundle"] = None  # failed before its bundle was written
    return row


def _run(job: CellJob, local: Mapping[str, Path]) -> dict[str, Any]:
    cell, out = job.cell, Path(job.out)
    model = local[str(cell.model)]
    bundle_path = store.cell_dir(out, job.key) / store.BUNDLE
    config = ExportConfig(target=cell.target, quant=cell.quant, calib=_source(cell.calib, local),
                          observer=cell.observer or ExportConfig.observer,
                          calibration=cell.calibration or ExportConfig.calibration, lowrank=cell.lowrank,
                          target_options=dict(cell.options), overwrite=True)  # a bundle of a killed attempt
    t0 = time.perf_counter()
    _stage("export", lambda: run_export(model, bundle_path, config))
    export_s = time.perf_counter() - t0
    bundle = read_bundle(bundle_path)
    m = bundle.manifest
    data = _source(cell.data, local) or ((m.get("model") or {}).get("meta") or {}).get("dataset")
    if not data:
        raise SweepError(f"model {cell.model.name} names no dataset to compare on; give data = NAME|FILE.npz "
                         "in the spec")
    threads = job.bench.threads if _takes_threads(bundle.target) else None
    bench_config = BenchConfig(runs=job.bench.runs, warmup=job.bench.warmup, threads=threads)
    measured: list[tuple[BenchReport, float]] = []
    measure = None
    if job.device_url:
        client = DeviceClient(job.device_url, job.device_token or "")

        def measure(path: Path, timing: BenchConfig) -> BenchReport:  # compare's timing, with the spec's runs
            t = time.perf_counter()
            try:
                measured.append((client.bench(path, bench_config), time.perf_counter() - t))
            except DeviceTargetError:
                raise  # compare makes it a skipped row: this device cannot run the target
            except EdgegateError as e:  # unreachable agent, refusal, a measurement that died: the bench's fault
                raise _StageError(f"bench: {one_line(e)}") from e
            return measured[-1][0]

    # Here compare's own latency runs are kept to one: the cell's latency is the bench below. With a device,
    # compare's timing is that bench, done by the agent (accuracy is still measured here).
    runs, warmup = (job.bench.runs, job.bench.warmup) if measure else (1, 0)
    t0 = time.perf_counter()
    report = _stage("compare", lambda: compare(model, [bundle_path], CompareConfig(
        data=data, max_samples=job.compare.max_samples, runs=runs, warmup=warmup), measure=measure))
    compare_s = time.perf_counter() - t0
    float_row, row = report.rows[0], report.rows[1]
    if row.status != "ok":  # the device cannot run this target
        raise _StageError(f"bench: {row.note.removeprefix('skipped: ')}")
    result: dict[str, Any] = {
        "metrics": plain(row.metrics), "reference": plain(float_row.metrics), "fidelity": plain(row.recorded),
        "data": report.data, "latency": None, "throughput": None, "batch": None, "device": None,
        "bundle_bytes": sum(p.stat().st_size for p in bundle_path.iterdir() if p.is_file()),
        "export_s": round(export_s, 3), "compare_s": round(compare_s, 3), "bench_s": None,
        "timings_s": m.get("timings_s") or {}, "note": row.note,
    }
    if measured:
        bench_report, bench_s = measured[-1]
        result["compare_s"] = round(compare_s - bench_s, 3)
    else:
        ok, why = targets.can_run(targets.get(bundle.target))
        if not ok:  # e.g. trt: the engine builds here, but runs only on a GPU
            result["note"] = f"not benched: target {bundle.target} cannot run on this node: {why}"
            return plain(result)
        t0 = time.perf_counter()
        bench_report = _stage("bench", lambda: bench(bundle_path, bench_config))
        bench_s = time.perf_counter() - t0
    result.update(latency=plain(dataclasses.asdict(bench_report.latency)), throughput=bench_report.throughput,
                  batch=bench_report.batch, bench_s=round(bench_s, 3), device=bench_report.device,
                  note="; ".join(n for n in (row.note, *bench_report.warnings) if n))
    return plain(result)


def _stage(name: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except EdgegateError as e:
        raise _StageError(f"{name}: {one_line(e)}") from e
    except (ArithmeticError, LookupError, RuntimeError, TypeError, ValueError, OSError) as e:
        # Not a problem the user can fix: keep the traceback in the node's log, the reason in the row.
        log.exception("cell stage %s failed", name)
        raise _StageError(f"{name}: {type(e).__name__}: {one_line(e)} (a bug; please report it)") from e


def _source(source: str | None, local: Mapping[str, Path]) -> str | None:
    """A built-in dataset name as is; a data file as this node's copy of it."""
    if source is None or not os.path.isabs(source):
        return source
    return str(local[source])


def _takes_threads(target: str) -> bool:
    # bench --threads applies to targets whose options have a thread count (cpu); snn and trt have none.
    fields = getattr(targets.get(target).options_type, "__dataclass_fields__", {})
    return any(k in fields for k in THREAD_OPTIONS)
