"""ONNX external data, confined: every tensor stored outside ``model.onnx`` must be a plain file in the bundle.

Input: serialized ONNX bytes (or a model file) and the bundle directory. Output: the external-data
locations, after checking that none is absolute, contains ``..``, goes through a link or resolves
outside the bundle -- otherwise a crafted model makes the runtime read (or a writer overwrite) any
file on the device (ONNX CVE-2022-25882, CVE-2024-27318, CVE-2025-51480). Used by `bundle` on write
and read, and by targets before handing a model to their runtime.

Runtime side: standard library only. ``onnx`` parses the model when installed; without it a small
protobuf wire-format walk finds the same locations (tests keep the two in agreement).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from edgegate.errors import BundleError, one_line


def check_onnx_external_data(
    model_path: str | os.PathLike[str], bundle_dir: str | os.PathLike[str]
) -> list[str]:
    """Check that every external-data location in the ONNX model stays inside `bundle_dir`.

    Returns the locations (relative names), each once. Raises `BundleError` naming the tensor and the
    location when one is empty, absolute, contains ``..`` or control characters, goes through a link,
    or resolves outside the bundle.
    """
    model_path, bundle_dir = Path(model_path), Path(bundle_dir)
    try:
        data = model_path.read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read {model_path}: {e.strerror or e}; check the bundle") from e
    return check_locations(external_data_locations(data, str(model_path)), bundle_dir, str(model_path))


def check_locations(locations: list[tuple[str, str | bytes]], bundle_dir: Path, what: str) -> list[str]:
    """`check_onnx_external_data` for (tensor, location) pairs already parsed out of `what`."""
    try:
        root = bundle_dir.resolve()
    except (OSError, RuntimeError) as e:
        raise BundleError(f"cannot resolve bundle directory {bundle_dir}: {one_line(e)}") from e
    found: list[str] = []
    for tensor, location in locations:
        where = f"{what}: external data location {_show(location)} of tensor {_show(tensor)}"
        if not isinstance(location, str):  # not valid UTF-8: no file name we could check means the same
            raise BundleError(f"{where} is not valid UTF-8; external data must be a plain file name")
        parts = location.replace("\\", "/").split("/")
        if not location:
            raise BundleError(f"{where} is empty; external data must name a file inside the bundle")
        if any(ord(c) < 32 or ord(c) == 127 for c in location):
            raise BundleError(f"{where} contains control characters; external data must be a plain file name")
        if PurePosixPath(location).is_absolute() or PureWindowsPath(location).is_absolute():
            raise BundleError(f"{where} is absolute; external data must be a relative file inside the bundle")
        if PureWindowsPath(location).drive or ".." in parts:
            raise BundleError(f"{where} leaves the bundle ('..'); external data must stay inside the bundle")
        target = bundle_dir / location
        for p in [target, *target.parents]:
            if p == bundle_dir or p in bundle_dir.parents:
                break
            if p.is_symlink():
                raise BundleError(f"{where} goes through a link; external data must be a regular file")
        try:
            inside = is_inside(target.resolve(), root)
        except (OSError, RuntimeError):  # a link loop, or a name the OS refuses
            inside = False
        if not inside:
            raise BundleError(f"{where} resolves outside the bundle; external data must stay inside it")
        if location not in found:
            found.append(location)
    return found


def is_inside(p: Path, root: Path) -> bool:
    """Whether the resolved path `p` is `root` or below it."""
    return p == root or root in p.parents


def _show(text: str | bytes, limit: int = 200) -> str:
    # Names come from the file: quoted (repr escapes control characters) and cut, so messages stay one line.
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def external_data_locations(data: bytes, what: str) -> list[tuple[str, str | bytes]]:
    """(tensor name, location) of every external-data entry of the serialized ONNX model `data`.

    Parsed with onnx when it is installed, else by a small protobuf wire-format walk (runtime side).
    A location that is not valid UTF-8 comes back as bytes (and `check_locations` refuses it).
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
        raise BundleError(f"{what} is not a valid ONNX model ({one_line(e, 120)}); re-export the bundle") from e


def _locations_onnx(model: Any) -> list[tuple[str, str | bytes]]:
    out: list[tuple[str, str | bytes]] = []

    def tensor(t: Any) -> None:
        # protobuf hands back bytes for a string field that is not valid UTF-8: keep such a location
        # as bytes (check_locations refuses it), and show such a name as the wire walk does.
        name = t.name if isinstance(t.name, str) else bytes(t.name).decode("utf-8", "replace")
        out.extend((name, e.value) for e in t.external_data if e.key == "location")

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


def _locations_wire(data: bytes) -> list[tuple[str, str | bytes]]:
    out: list[tuple[str, str | bytes]] = []
    stack = [("model", memoryview(data))]
    while stack:
        kind, buf = stack.pop()
        if kind == "tensor":
            name, locs = "", []
            for field, value in _wire_fields(buf):
                if field == _TENSOR_NAME and isinstance(value, memoryview):
                    name = bytes(value).decode("utf-8", "replace")
                elif field == _TENSOR_EXTERNAL and isinstance(value, memoryview):
                    # StringStringEntryProto: key=1, value=2 (the last of each wins, as in protobuf).
                    entry = {f: _text(v) for f, v in _wire_fields(value) if isinstance(v, memoryview)}
                    if entry.get(1) == "location":
                        locs.append(entry.get(2, ""))
            out.extend((name, loc) for loc in locs)
            continue
        children = _WIRE_SCHEMA[kind]
        for field, value in _wire_fields(buf):
            if field in children and isinstance(value, memoryview):
                stack.append((children[field], value))
    return out


def _text(raw: memoryview) -> str | bytes:
    """A protobuf string: str when valid UTF-8, else the raw bytes (as protobuf's own parser returns it)."""
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return bytes(raw)


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
