"""Sweep output directory: layout, content keys, atomic JSON, the row cache, leftover clean-up.

Input: the ``-o DIR`` of a sweep and the cells it runs. Output (README, "Sweeps"):

    DIR/sweep.json                 the report (`FORMAT`), rewritten atomically after every row
    DIR/report.html, report_files/ the Pareto plots and the table (``report.py``)
    DIR/files/<sha>/<name>         content-addressed copies of the model and data files the cells read
    DIR/cells/<key>/bundle/        the cell's bundle (``write_bundle``: temp dir + rename)
    DIR/cells/<key>/row.json       the cell's row, written atomically by the driver when it arrives
    DIR/logs/ray-<time>/           a local Ray's logs

A cell's key is the sha256 of (model file sha256, data file sha256s, the normalised cell config,
the bench/compare settings, the edgegate version): a row on disk with status ok under that key is
the cell's result, so a re-run skips it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import edgegate
from edgegate.bundle import read_bundle, sha256_file
from edgegate.errors import EdgegateError, one_line, os_error_text
from edgegate.sweep.spec import Cell, CellStatus, SweepError, SweepSpec, read_parsed

log = logging.getLogger(__name__)

FORMAT = "edgegate.sweep"
FORMAT_VERSION = 1
SWEEP_JSON = "sweep.json"
ROW_JSON = "row.json"
BUNDLE = "bundle"
KEY_CHARS = 20  # of the sha256 in a cell's folder name: short paths, collisions out of reach
FILE_CHARS = 16


def key_of(cell: Cell, spec: SweepSpec, shas: Mapping[str, str]) -> str:
    """The content key of `cell`: what it computes from, not where the files are (`shas`: path -> sha256)."""
    config = cell.config()
    del config["model"]  # the name is not content; a renamed model is the same cell
    payload = {
        "model_sha256": shas[str(cell.model)],
        "data_sha256": shas.get(cell.data or ""), "calib_sha256": shas.get(cell.calib or ""),
        "cell": config,
        "bench": spec.to_dict()["bench"], "compare": spec.to_dict()["compare"],
        "edgegate": edgegate.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cell_dir(out: Path, key: str) -> Path:
    return out / "cells" / key[:KEY_CHARS]


def file_copy(out: Path, name: str, sha: str) -> Path:
    return out / "files" / sha[:FILE_CHARS] / name


def hash_files(spec: SweepSpec) -> dict[str, str]:
    """sha256 of every file the cells read (models, .npz data), keyed by its absolute path."""
    paths = [str(m) for m in spec.models] + [s for s in (spec.data, spec.calib) if s and os.path.isabs(s)]
    shas = {}
    for p in dict.fromkeys(paths):
        try:
            shas[p] = sha256_file(p)
        except OSError as e:
            raise SweepError(f"cannot read {p}: {os_error_text(e)}") from e
    return shas


# ----------------------------------------------------------------------------------------------- files


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as strict JSON to `path` atomically (temp file beside it, fsync, rename)."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    write_bytes(path, text.encode())


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)  # read by setting; put back at once
    os.umask(mask)
    return mask


def materialise(out: Path, name: str, sha: str, data: bytes | None, source: str | None = None) -> Path:
    """The node-local copy of an input file under DIR/files/; written from `data` (or `source`) when absent."""
    path = file_copy(out, name, sha)
    if path.is_file() and sha256_file(path) == sha:
        return path
    if data is None:
        if source is None:
            raise SweepError(f"{path} is missing on this node and no copy was sent; run the sweep again")
        data = Path(source).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha:
        raise SweepError(f"{source or name} changed while the sweep ran (sha256 differs); run the sweep again")
    write_bytes(path, data)
    return path


def clean_leftovers(cell: Path) -> list[str]:
    """Remove what an attempt killed mid-write left in its cell folder (write_bundle's temp/old dirs)."""
    removed = []
    if not cell.is_dir():
        return removed
    for entry in cell.iterdir():  # only write_bundle's own names for `bundle`: nothing a user made
        if entry.name.startswith(f".{BUNDLE}.") and (entry.name.endswith(".tmp") or ".old-" in entry.name):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry.name)
        elif entry.name.startswith(f".{ROW_JSON}.") and entry.name.endswith(".tmp"):
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


# ------------------------------------------------------------------------------------------- directory


def check_out_dir(out: Path) -> None:
    """`out` must be new, empty, or an earlier sweep's folder: a sweep never writes into someone else's files."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise SweepError(f"-o {out} exists and is not a directory; choose another -o")
    if not out.exists() or not any(out.iterdir()):
        return
    sweep_json = out / SWEEP_JSON
    if not sweep_json.is_file():
        raise SweepError(f"-o {out} is not empty and holds no {SWEEP_JSON}; give a new folder or an earlier "
                         "sweep's folder")
    header = read_sweep_json(out)
    if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
        raise SweepError(f"{sweep_json} is not an {FORMAT} v{FORMAT_VERSION} report (format "
                         f"{header.get('format')!r}, version {header.get('version')!r}); choose another -o")


def read_sweep_json(out: Path) -> dict[str, Any]:
    path = out / SWEEP_JSON
    data = read_parsed(path, json.loads, str(path), lambda e: f"{path} is not valid JSON ({one_line(e, 100)}); "
                       "choose another -o")
    if not isinstance(data, dict):
        raise SweepError(f"{path} is not a JSON object; choose another -o")
    return data


def recorded_spec(out: Path) -> SweepSpec:
    """The spec an earlier sweep in `out` ran (for ``--resume``), with its files' absolute paths."""
    if not (out / SWEEP_JSON).is_file():
        raise SweepError(f"--resume: {out} holds no {SWEEP_JSON}; give the sweep's SPEC.toml to start it")
    check_out_dir(out)
    return SweepSpec.from_dict(read_sweep_json(out).get("spec") or {}, str(out / SWEEP_JSON))


def cached_row(out: Path, key: str) -> dict[str, Any] | None:
    """The finished row of cell `key`, if its row says ok and its bundle is on this node and verifies.

    A row made on another node (no shared folder) is trusted as is: its bundle lives on that node.
    """
    path = cell_dir(out, key) / ROW_JSON
    if not path.is_file():
        return None
    try:
        row = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s (%s); the cell runs again", path, one_line(e, 100))
        return None
    if not isinstance(row, dict) or row.get("key") != key or row.get("status") != CellStatus.OK:
        return None
    bundle = out / str(row.get("bundle") or "")
    if bundle.is_dir() or (row.get("node") or {}).get("hostname") == socket.gethostname():
        try:
            read_bundle(bundle)
        except EdgegateError as e:
            log.warning("cell %s: its bundle no longer verifies (%s); the cell runs again", key[:KEY_CHARS], e)
            return None
    return row

