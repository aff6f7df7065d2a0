"""Stage 7, bundle: a target's files + a manifest -> a verified bundle directory, and back (DESIGN.md §8).

Input: file contents (bytes or paths) and a manifest dict. Output: a directory holding
``manifest.json`` (with per-file sha256 and byte counts), ``model.onnx``, target files and
``golden_io.npz``, written to a temp dir beside the destination and renamed into place, so a reader
never sees half a bundle. `read_bundle` verifies it and returns a `Bundle`.

Manifest keys read here: ``manifest_version``, ``files``, ``target`` and ``target_options`` (the
target's options as a dict; the target rebuilds its options dataclass from it).

Runtime side: standard library only (``onnx`` is used when present, never required), so devices
that only have numpy + onnxruntime can read and verify bundles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from edgegate.errors import BundleError

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(sorted(self.manifest.get("files", {})))

    @property
    def target(self) -> str:
        target = self.manifest.get("target")
        if not isinstance(target, str):
            raise BundleError(f"bundle {self.path}: manifest.json names no target; re-export the bundle")
        return target

    @property
    def target_options(self) -> dict[str, Any]:
        return dict(self.manifest.get("target_options") or {})

    def file(self, name: str) -> Path:
        if name not in self.manifest.get("files", {}):
            raise BundleError(
                f"bundle {self.path} has no file {name} (it has: {', '.join(self.files) or 'none'}); "
                "re-export the bundle for this target"
            )
        return self.path / name


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- write


def write_bundle(
    dest: str | os.PathLike[str],
    files: Mapping[str, bytes | os.PathLike[str]],
    manifest: Mapping[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Write `files` and `manifest` as the bundle directory `dest`, atomically; return its path."""
    dest = Path(dest)
    for name, src in files.items():
        _check_name(name, f"cannot write bundle {dest}")
        if name == MANIFEST_NAME:
            raise BundleError(
                f"cannot write bundle {dest}: {MANIFEST_NAME} is written by write_bundle itself"
            )
        if not isinstance(src, (bytes, bytearray, memoryview, os.PathLike)):
            raise BundleError(
                f"cannot write bundle {dest}: file {name} must be bytes or a path, not {type(src)}"
            )
    if (dest.exists() or dest.is_symlink()) and not overwrite:
        raise BundleError(
            f"bundle {dest} already exists; pass overwrite=True (--force) or choose another path"
        )
    manifest = dict(manifest)  # never mutate the caller's dict
    tmp: Path | None = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Same directory as dest: the final rename stays on one filesystem and is atomic.
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        entries = {name: _write_file(tmp / name, src) for name, src in files.items()}
        manifest["files"] = entries
        manifest["manifest_version"] = MANIFEST_VERSION
        try:
            text = json.dumps(manifest, sort_keys=True, indent=2) + "\n"
        except (TypeError, ValueError) as e:
            raise BundleError(f"cannot write bundle {dest}: manifest is not JSON-serializable ({e})") from e
        _write_file(tmp / MANIFEST_NAME, text.encode())
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a bundle gets normal directory rights
        _fsync_dir(tmp)
        _move_into_place(tmp, dest)
        tmp = None
        _fsync_dir(dest.parent)
    except OSError as e:
        raise BundleError(
            f"cannot write bundle {dest}: {e.strerror or e}"
            + (f" ({e.filename})" if e.filename else "")
            + "; check free space and permissions"
        ) from e
    finally:
        # Runs on every exit, KeyboardInterrupt included: no half-written temp dir is left behind.
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _write_file(path: Path, src: bytes | bytearray | memoryview | os.PathLike[str]) -> dict[str, Any]:
    h, n = hashlib.sha256(), 0
    with open(path, "xb") as out:
        if isinstance(src, os.PathLike):
            with open(src, "rb") as f:
                for chunk in iter(lambda: f.read(_CHUNK), b""):
                    out.write(chunk)
                    h.update(chunk)
                    n += len(chunk)
        else:
            data = bytes(src)
            out.write(data)
            h.update(data)
            n = len(data)
        out.flush()
        os.fsync(out.fileno())
    return {"sha256": h.hexdigest(), "bytes": n}


def _move_into_place(tmp: Path, dest: Path) -> None:
    if not (dest.exists() or dest.is_symlink()):
        os.rename(tmp, dest)
        return
    # Overwrite: move the old bundle aside, rename the new one in, then delete the old one, so a
    # crash in between leaves either bundle intact under some name, never a mix of the two.
    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it and put it back
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open a directory for fsync
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_name(name: object, context: str) -> None:
    """Bundle file names are plain names in the bundle folder: no folders, `..`, or absolute paths."""
    ok = (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and not PureWindowsPath(name).drive
    )
    if not ok:
        raise BundleError(
            f"{context}: file name {name!r} must be a plain file name (no folders, '..', or '/')"
        )


# ---------------------------------------------------------------------------------------------- read


def read_bundle(path: str | os.PathLike[str], *, verify: bool = True) -> Bundle:
    """Read and check the bundle at `path`; with `verify`, also check every file's size and sha256."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle {path} is missing or not a directory; run `edgegate export` to create it")
    mpath = path / MANIFEST_NAME
    if mpath.is_symlink() or not mpath.is_file():
        raise BundleError(f"bundle {path} has no {MANIFEST_NAME} (or it is a link); re-export the bundle")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(
            f"bundle {path}: {MANIFEST_NAME} is not valid JSON ({e}); re-export the bundle"
        ) from e
    if not isinstance(manifest, dict):
        raise BundleError(f"bundle {path}: {MANIFEST_NAME} is not a JSON object; re-export the bundle")
    version = manifest.get("manifest_version")
    if version != MANIFEST_VERSION:
        raise BundleError(
            f"bundle {path}: manifest_version {version!r} is not supported (this edgegate reads "
            f"{MANIFEST_VERSION}); upgrade edgegate or re-export the bundle"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"bundle {path}: {MANIFEST_NAME} has no 'files' table; re-export the bundle")
    for name, entry in files.items():
        _check_name(name, f"bundle {path}")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)):
            raise BundleError(f"bundle {path}: manifest entry for {name} has no sha256; re-export the bundle")
        fp = path / name
        if fp.is_symlink() or not fp.is_file():
            raise BundleError(
                f"bundle {path}: file {name} listed in {MANIFEST_NAME} is missing or not a regular file; "
                "re-export the bundle"
            )
        if verify and (fp.stat().st_size != entry.get("bytes") or sha256_file(fp) != entry["sha256"]):
            raise BundleError(
                f"bundle {path}: file {name} does not match its sha256 in {MANIFEST_NAME} "
                "(modified or corrupt); re-export the bundle"
            )
    _check_unlisted_links(path)
    # A safety check, not an integrity one, so it runs even with verify=False.
    for name in files:
        if name.endswith(".onnx"):
            for location in check_onnx_external_data(path / name, path):
                if location not in files:
                    raise BundleError(
                        f"bundle {path}: external data {location} of {name} is not listed in "
                        f"{MANIFEST_NAME}, so it cannot be verified; re-export the bundle"
                    )
    return Bundle(path=path, manifest=manifest)


def _check_unlisted_links(path: Path) -> None:
    # Files the manifest does not list are ignored, but a link out of the bundle could still be
    # reached by name (e.g. as ONNX external data), so refuse those.
    root = path.resolve()
    for entry in path.iterdir():
        if entry.is_symlink() and not _is_inside(entry.resolve(), root):
            raise BundleError(f"bundle {path}: {entry.name} is a link pointing outside the bundle; remove it")


def _is_inside(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


# ---------------------------------------------------------------------------------- ONNX external data


def check_onnx_external_data(
    model_path: str | os.PathLike[str], bundle_dir: str | os.PathLike[str]
) -> list[str]:
    """Check that every external-data location in the ONNX model stays inside `bundle_dir`.

    Returns the locations (relative names). A location that is absolute, contains ``..``, goes through
    a link, or resolves outside the bundle would let a crafted model read any file on the device
    (ONNX CVE-2022-25882 and CVE-2024-27318: path traversal via external_data ``location``).
    """
    model_path, bundle_dir = Path(model_path), Path(bundle_dir)
    try:
        data = model_path.read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read {model_path}: {e.strerror or e}") from e
    root = bundle_dir.resolve()
    found = []
    for tensor, location in external_data_locations(data, str(model_path)):
        where = f"{model_path}: external data location {location!r} of tensor {tensor!r}"
        parts = location.replace("\\", "/").split("/")
        if not location or PurePosixPath(location).is_absolute() or PureWindowsPath(location).is_absolute():
            raise BundleError(f"{where} is absolute; external data must be a relative file inside the bundle")
        if PureWindowsPath(location).drive or ".." in parts:
            raise BundleError(f"{where} leaves the bundle ('..'); external data must stay inside the bundle")
        target = bundle_dir / location
        for p in [target, *target.parents]:
            if p == bundle_dir or p in bundle_dir.parents:
                break
            if p.is_symlink():
                raise BundleError(f"{where} goes through a link; external data must be a regular file")
        if not _is_inside(target.resolve(), root):
            raise BundleError(f"{where} resolves outside the bundle; external data must stay inside it")
        if location not in found:
            found.append(location)
    return found


def external_data_locations(data: bytes, what: str) -> list[tuple[str, str]]:
    """(tensor name, location) of every external-data entry of the serialized ONNX model `data`.

    Parsed with onnx when it is installed, else by a small protobuf wire-format walk (runtime side).
    """
    try:
        import onnx
    except ImportError:
        onnx = None
    try:
        if onnx is not None:
            return _locations_onnx(onnx.load_model_from_string(data))
        return _locations_wire(data)
    except Exception as e:  # DecodeError, or our wire parser's ValueError on malformed bytes
        raise BundleError(f"{what} is not a valid ONNX model ({e}); re-export the bundle") from e


def _locations_onnx(model: Any) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []

    def tensor(t: Any) -> None:
        out.extend((t.name, e.value) for e in t.external_data if e.key == "location")

    def attrs(attributes: Any) -> None:
        for a in attributes:
            if a.HasField("t"):
                tensor(a.t)
            for t in a.tensors:
                tensor(t)
            for s in [*a.sparse_tensors, *([a.sparse_tensor] if a.HasField("sparse_tensor") else [])]:
                tensor(s.values)
                tensor(s.indices)
            for g in [*a.graphs, *([a.g] if a.HasField("g") else [])]:
                graph(g)

    def graph(g: Any) -> None:
        for t in g.initializer:
            tensor(t)
        for s in g.sparse_initializer:
            tensor(s.values)
            tensor(s.indices)
        for n in g.node:
            attrs(n.attribute)

    graph(model.graph)
    for f in model.functions:
        attrs(f.attribute_proto)
        for n in f.node:
            attrs(n.attribute)
    for ti in model.training_info:
        graph(ti.initialization)
        graph(ti.algorithm)
    return out


# Without onnx, walk the protobuf wire format directly. Message kind -> {field number: child kind};
# field numbers are from onnx.proto (ModelProto.graph=7, GraphProto.initializer=5, ...).
_WIRE_SCHEMA: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attr"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attr"},
    "attr": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_TENSOR_NAME, _TENSOR_EXTERNAL = 8, 13


def _locations_wire(data: bytes) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    stack = [("model", memoryview(data))]
    while stack:
        kind, buf = stack.pop()
        if kind == "tensor":
            name, locs = "", []
            for field, value in _wire_fields(buf):
                if field == _TENSOR_NAME and isinstance(value, memoryview):
                    name = bytes(value).decode("utf-8", "replace")
                elif field == _TENSOR_EXTERNAL and isinstance(value, memoryview):
                    entry = {f: bytes(v).decode("utf-8", "replace") for f, v in _wire_fields(value)}
                    if entry.get(1) == "location":  # StringStringEntryProto: key=1, value=2
                        locs.append(entry.get(2, ""))
            out.extend((name, loc) for loc in locs)
            continue
        children = _WIRE_SCHEMA[kind]
        for field, value in _wire_fields(buf):
            if field in children and isinstance(value, memoryview):
                stack.append((children[field], value))
    return out


def _wire_fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """Yield (field number, value) of one protobuf message: ints for varints, views for bytes."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield field, value
        elif wire == 2:
            size, i = _varint(buf, i)
            if i + size > n:
                raise ValueError("truncated length-delimited field")
            yield field, buf[i : i + size]
            i += size
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    if i != n:
        raise ValueError("truncated message")


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i
