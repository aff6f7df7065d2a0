"""The sweep driver: a `SweepSpec` -> cells run as Ray tasks -> ``DIR/sweep.json`` and ``DIR/report.html``.

Input: a validated spec, the output folder, where Ray runs (`RayOptions`: a local instance started
for the run by default, or an existing cluster's address). Steps: hash the input files, expand the
cells and key them by content (``store.key_of``), take finished rows from disk (the cache), check the
device agent when the spec names one, start or join Ray, submit one task per remaining cell (declared
CPUs and memory, spread over the nodes, ``max_retries`` when a worker or node dies), write each row
atomically as it arrives, then the report. Ctrl-C cancels what is still running (the cancelled tasks'
``write_bundle`` removes its temp dir) and re-raises after writing ``sweep.json``: finished cells stay
usable. Output: `SweepResult`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import edgegate
from edgegate.errors import one_line
from edgegate.sweep import store
from edgegate.sweep.cell import CellJob, run_cell
from edgegate.sweep.report import check_report_deps, write_report
from edgegate.sweep.spec import Cell, CellStatus, SweepError, SweepSpec, SweepStatus, expand

log = logging.getLogger(__name__)

INSTALL_RAY = "edgegate sweep runs on Ray; pip install 'edgegate[cluster]'"
WAIT_S = 0.5  # how often the driver wakes while cells run (Ctrl-C is seen at least this often)
CANCEL_GRACE_S = 10.0  # how long cancelled cells get to unwind (remove their temp dirs) before they are killed
CONNECT_TIMEOUT_S = 5.0
OBJECT_STORE_MIB = 256  # a local Ray's shared memory: it only carries model files and rows


@dataclass(frozen=True)
class RayOptions:
    """Where cells run: ``address`` of an existing cluster, else a local Ray with ``num_cpus`` (default: all)."""

    address: str | None = None
    num_cpus: int | None = None

    def __post_init__(self) -> None:
        if self.address is not None and self.num_cpus is not None:
            raise SweepError("--num-cpus sizes the local Ray; a cluster's nodes declare their CPUs with "
                             "`ray start --num-cpus`; give one of --num-cpus and --ray-address")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise SweepError(f"--num-cpus {self.num_cpus} must be >= 1")


@dataclass(frozen=True)
class SweepResult:
    out: Path
    rows: tuple[dict[str, Any], ...]
    wall_s: float
    report: Path | None  # None when no cell finished ok (nothing to plot); the table is in sweep.json


OnRow = Callable[[dict[str, Any], int, int], None]  # (row, cells done, cells in all)


def run_sweep(spec: SweepSpec, out: str | Path, ray_options: RayOptions | None = None,
              on_row: OnRow | None = None) -> SweepResult:
    """Run every cell of `spec` not already finished in `out`; see the module doc."""
    check_report_deps()  # fail now, not after an hour of cells
    out = Path(out).absolute()
    store.check_out_dir(out)
    ray_options = ray_options or RayOptions()
    start = time.perf_counter()
    shas = store.hash_files(spec)
    cells = expand(spec)
    keys = [store.key_of(c, spec, shas) for c in cells]
    rows: list[dict[str, Any] | None] = []
    for cell, key in zip(cells, keys, strict=True):
        row = store.cached_row(out, key)
        # The same content under another model name is the same cell; show it under this spec's name.
        rows.append(None if row is None else {**row, "name": cell.name, "cell": cell.config(), "cached": True})
    header = {"created": datetime.now(UTC).isoformat(timespec="seconds"), "spec": spec.to_dict(),
              "ray": None}
    cached = [r for r in rows if r is not None]
    for n, row in enumerate(cached, 1):
        if on_row:
            on_row(row, n, len(cells))
    todo = [i for i, r in enumerate(rows) if r is None]
    token = None
    if todo:  # what can be refused without running anything is refused before anything is written
        _import_ray()
        if ray_options.address:
            _check_reachable(ray_options.address)
        if spec.device is not None:
            client = spec.device.client()
            client.info()  # reachable, our token, an edgegate agent: or one line now, not one per cell
            token = client.token
    _write_sweep(out, header, cells, keys, rows, SweepStatus.RUNNING, time.perf_counter() - start)
    if todo:
        for path, sha in shas.items():  # this node's copies, before any cell asks
            store.materialise(out, Path(path).name, sha, None, path)
        with _ray_session(ray_options, out) as (ray, info):
            header["ray"] = info
            try:
                _run_cells(ray, spec, out, shas, cells, keys, rows, todo, header, start, on_row, token)
            except BaseException as e:
                status = SweepStatus.INTERRUPTED if isinstance(e, KeyboardInterrupt) else SweepStatus.STOPPED
                _write_sweep(out, header, cells, keys, rows, status, time.perf_counter() - start)
                raise
    wall = time.perf_counter() - start
    _write_sweep(out, header, cells, keys, rows, SweepStatus.COMPLETE, wall)
    final = [r for r in rows if r is not None]
    report = write_report(out, store.read_sweep_json(out)) if any(r["status"] == CellStatus.OK for r in final) else None
    return SweepResult(out=out, rows=tuple(final), wall_s=wall, report=report)


def _run_cells(ray: Any, spec: SweepSpec, out: Path, shas: dict[str, str], cells: list[Cell], keys: list[str],
               rows: list[dict[str, Any] | None], todo: list[int], header: dict[str, Any], start: float,
               on_row: OnRow | None, device_token: str | None) -> None:
    _check_fits(ray, spec)
    blobs = {path: ray.put(Path(store.file_copy(out, Path(path).name, s)).read_bytes()) for path, s in shas.items()}
    task = ray.remote(sweep_cell).options(
        num_cpus=spec.ray.cpus_per_cell, memory=spec.ray.memory_mib_per_cell << 20,
        max_retries=spec.ray.max_retries, retry_exceptions=False, scheduling_strategy="SPREAD")
    pending: dict[Any, list[int]] = {}  # task -> the cells it answers (same content under two names: one task)
    by_key: dict[str, list[int]] = {}
    for i in todo:
        by_key.setdefault(keys[i], []).append(i)
    ips: dict[str, str] = {}
    for key, same in by_key.items():
        cell = cells[same[0]]
        inputs = tuple((p, shas[p]) for p in dict.fromkeys(
            s for s in (str(cell.model), cell.data, cell.calib) if s and os.path.isabs(s)))
        job = CellJob(cell=cell, key=key, out=str(out), inputs=inputs, bench=spec.bench,
                      compare=spec.compare, version=edgegate.__version__, device_url=cell.device,
                      device_token=device_token)
        pending[task.remote(job, *(blobs[p] for p, _ in inputs))] = same
    done = len(cells) - len(todo)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_S)
            for ref in ready:
                same = pending.pop(ref)
                row = _result(ray, ref, cells[same[0]], keys[same[0]], out, spec.ray.max_retries)
                if row.get("node"):  # the address the node joined the cluster with (the task sees only its own)
                    row["node"]["ip"] = _node_ip(ray, row["node"]["id"], ips)
                store.write_json(store.cell_dir(out, keys[same[0]]) / store.ROW_JSON, row)
                for i in same:
                    rows[i] = {**row, "name": cells[i].name, "cell": cells[i].config()}
                    done += 1
                    _write_sweep(out, header, cells, keys, rows, SweepStatus.RUNNING, time.perf_counter() - start)
                    if on_row:
                        on_row(rows[i], done, len(cells))
    except BaseException:  # Ctrl-C (KeyboardInterrupt), SIGTERM via the CLI: stop the cells still running
        _cancel(ray, list(pending))
        for same in pending.values():
            store.clean_leftovers(store.cell_dir(out, keys[same[0]]))
        raise


def sweep_cell(job: CellJob, *blobs: bytes) -> dict[str, Any]:
    """The Ray task: the cell, plus the node that ran it (for the report and the cache check)."""
    import ray  # present wherever Ray runs this task

    row = run_cell(job, *blobs)
    row["node"] = {"id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
                   "pid": os.getpid()}
    return row


def _node_ip(ray: Any, node_id: str, ips: dict[str, str]) -> str | None:
    if node_id not in ips:
        ips.update({n["NodeID"]: n.get("NodeManagerAddress") for n in ray.nodes()})
    return ips.get(node_id)


def _result(ray: Any, ref: Any, cell: Cell, key: str, out: Path, retries: int) -> dict[str, Any]:
    """The row a finished task returned, or an error row saying why it returned none."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:  # an exception run_cell does not turn into a row (a bug)
        error = f"{type(e.cause).__name__}: {one_line(e.cause)}" if e.cause is not None else one_line(e)
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.OutOfMemoryError,
            ray.exceptions.LocalRayletDiedError) as e:
        error = f"the worker running this cell died {retries + 1} times (last: {type(e).__name__}: " \
                f"{one_line(e, 160)}); see the Ray logs"
    except ray.exceptions.RayError as e:
        error = f"{type(e).__name__}: {one_line(e, 200)}"
    store.clean_leftovers(store.cell_dir(out, key))
    return {"key": key, "name": cell.name, "cell": cell.config(), "status": CellStatus.ERROR, "error": error,
            "note": "", "bundle": None, "cached": False, "node": None}


def _cancel(ray: Any, refs: list[Any]) -> None:
    """Cancel `refs`: first as an interrupt (each task's ``finally`` runs, temp dirs go), then by force."""
    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=False)
    with contextlib.suppress(Exception):
        ray.wait(refs, num_returns=len(refs), timeout=CANCEL_GRACE_S)
    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)


def _check_fits(ray: Any, spec: SweepSpec) -> None:
    """Refuse a cell size no node can hold: Ray would wait forever for it."""
    need_cpu, need_mem = spec.ray.cpus_per_cell, spec.ray.memory_mib_per_cell << 20
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not any(r.get("CPU", 0) >= need_cpu and r.get("memory", 0) >= need_mem for r in nodes):
        biggest = max(nodes, key=lambda r: (r.get("CPU", 0), r.get("memory", 0)), default={})
        raise SweepError(f"no Ray node has {need_cpu:g} CPUs and {spec.ray.memory_mib_per_cell} MiB for a cell "
                         f"(largest: {biggest.get('CPU', 0):g} CPUs, {int(biggest.get('memory', 0)) >> 20} MiB); "
                         "lower [ray] cpus_per_cell / memory_mib_per_cell in the spec")


# ------------------------------------------------------------------------------------------------- Ray


def _import_ray() -> Any:
    try:
        import ray  # the `cluster` extra; absent on installs that never sweep
    except ImportError as e:
        raise SweepError(INSTALL_RAY) from e
    return ray


@contextlib.contextmanager
def _ray_session(options: RayOptions, out: Path) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Ray for this run: join ``options.address``, or start a local instance and stop it at the end."""
    ray = _import_ray()
    quiet = logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.ERROR  # Ray's banner and notes
    if ray.is_initialized():
        raise SweepError("Ray is already initialised in this process; call run_sweep from a process without "
                         "its own ray.init")
    if options.address:
        try:
            ray.init(address=options.address, log_to_driver=False, logging_level=quiet)
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as e:
            raise SweepError(f"cannot join the Ray cluster at {options.address}: {one_line(e, 200)}; start it "
                             "with `ray start --head` or check --ray-address") from e
        try:
            yield ray, _describe(ray, options.address)
        finally:
            ray.shutdown()
        return
    # Ray's unix sockets live under its temp dir and must stay short: a fresh folder in the system temp,
    # whose logs move into DIR/logs when the run ends.
    tmp = tempfile.mkdtemp(prefix="edgegate-ray-")
    try:
        ray.init(address="local", num_cpus=options.num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 _temp_dir=tmp, log_to_driver=False, logging_level=quiet,
                 object_store_memory=OBJECT_STORE_MIB << 20)
        try:
            yield ray, _describe(ray, None)
        finally:
            ray.shutdown()
    finally:
        _keep_logs(Path(tmp), out)
        shutil.rmtree(tmp, ignore_errors=True)


def _check_reachable(address: str) -> None:
    """Refuse an address no Ray head answers on: ``ray.init`` would retry it for minutes, silently."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SweepError(f"--ray-address {address!r} must be HOST:PORT of a Ray head (`ray start --head --port "
                         "PORT` prints it)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise SweepError(f"cannot reach a Ray head at {address} ({e.strerror or e}); start one with "
                         "`ray start --head` or check --ray-address") from e


def _describe(ray: Any, address: str | None) -> dict[str, Any]:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {"address": address or "local", "version": ray.__version__, "nodes": len(nodes),
            "cpus": sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)}


def _keep_logs(tmp: Path, out: Path) -> None:
    for logs in tmp.glob("session_*/logs"):
        if logs.is_dir() and not logs.parent.is_symlink():
            dest = out / "logs" / f"ray-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            with contextlib.suppress(OSError):
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(logs), dest)


# ------------------------------------------------------------------------------------------ sweep.json


def _write_sweep(out: Path, header: dict[str, Any], cells: list[Cell], keys: list[str],
                 rows: list[dict[str, Any] | None], status: SweepStatus, wall_s: float) -> None:
    shown = [r if r is not None else {"key": k, "name": c.name, "cell": c.config(), "status": CellStatus.PENDING,
                                      "error": None, "cached": False}
             for c, k, r in zip(cells, keys, rows, strict=True)]
    counts = {s: sum(r["status"] == s for r in shown) for s in CellStatus}
    summary = {"cells": len(shown), **counts, "cached": sum(bool(r.get("cached")) for r in shown)}
    store.write_json(out / store.SWEEP_JSON, {
        "format": store.FORMAT, "version": store.FORMAT_VERSION, "edgegate": edgegate.__version__,
        "status": status, "wall_s": round(wall_s, 3), **header, "summary": summary, "rows": shown})
