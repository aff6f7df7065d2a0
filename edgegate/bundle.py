"""Stage 7, bundle: a bundle directory -> a verified `Bundle` (DESIGN.md §8); the checks writing shares.

Input: a directory written by `edgegate.bundle_write.write_bundle` (``manifest.json`` with per-file sha256 and
byte counts, ``model.onnx``, target files, ``golden_io.npz``). Output: `read_bundle` checks it (manifest shape,
plain file names, every file's size and sha256, ONNX external data confined to the bundle) and returns a
`Bundle`. The name and external-data checks here are the ones writing applies before it renames a bundle into
place.

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
import re
from collections.abc import Mapping
from pathlib import Path, PureWindowsPath
from typing import Any

from edgegate.errors import BundleError, one_line, os_error_text
from edgegate.onnx_safety import check_locations, check_onnx_external_data, external_data_locations, is_inside

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "Bundle",
    "check_onnx_external_data",
    "external_data_locations",
    "read_bundle",
    "sha256_file",
]

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
# A manifest is a few KiB; refuse to parse anything absurd before reading it into memory.
MANIFEST_MAX_BYTES = 16 << 20
HASH_CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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
        options = self.manifest.get("target_options") or {}
        if not isinstance(options, dict):
            raise BundleError(f"bundle {self.path}: target_options in manifest.json is not an object")
        return dict(options)

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
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def is_plain_name(name: object) -> bool:
    """A plain file name, on every OS: no folders, `.`/`..`, drive, control characters; at most 255 bytes."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and not any(ord(c) < 32 or ord(c) == 127 for c in name)
        and not PureWindowsPath(name).drive
        and len(name.encode("utf-8", "surrogatepass")) <= 255
    )


def check_name(name: object, context: str) -> None:
    """Bundle file names are plain names in the bundle folder: no folders, `..`, absolute paths or controls."""
    if not is_plain_name(name):
        raise BundleError(
            f"{context}: file name {show_name(name)} must be a plain file name (no folders, '..', or '/')"
        )


def check_external_data(path: Path, files: Mapping[str, Any], context: str) -> None:
    # Every ONNX file's external data must be a file of this bundle, listed (so its sha256 is checked).
    for name in files:
        if not name.endswith(".onnx"):
            continue
        what = f"{context}: {name}"
        try:
            data = (path / name).read_bytes()
        except OSError as e:
            raise BundleError(f"{what} cannot be read: {e.strerror or e}") from e
        for location in check_locations(external_data_locations(data, what), path, what):
            if location not in files:
                raise BundleError(
                    f"{context}: external data {show_name(location)} of {name} is not listed in "
                    f"{MANIFEST_NAME}, so it cannot be verified; re-export the bundle"
                )


def show_name(text: object, limit: int = 200) -> str:
    # Names come from files: quoted (repr escapes control characters) and cut, so messages stay one line.
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


# ---------------------------------------------------------------------------------------------- read


def read_bundle(path: str | os.PathLike[str], *, verify: bool = True) -> Bundle:
    """Read and check the bundle at `path`; with `verify`, also check every file's size and sha256.

    Any damaged, tampered or hostile bundle raises `BundleError` naming the file and what to do.
    """
    path = Path(path)
    try:
        manifest = _read_manifest(path)
        _check_files(path, manifest["files"], verify)
        _check_unlisted_links(path)
    except OSError as e:
        raise BundleError(f"bundle {path} cannot be read: {os_error_text(e)}; check its permissions") from e
    # A safety check, not an integrity one, so it runs even with verify=False.
    check_external_data(path, manifest["files"], f"bundle {path}")
    return Bundle(path=path, manifest=manifest)


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise BundleError(f"bundle {path} is missing or not a directory; run `edgegate export` to create it")
    mpath = path / MANIFEST_NAME
    if mpath.is_symlink() or not mpath.is_file():
        raise BundleError(f"bundle {path} has no {MANIFEST_NAME} (or it is a link); re-export the bundle")
    if mpath.stat().st_size > MANIFEST_MAX_BYTES:
        raise BundleError(f"bundle {path}: {MANIFEST_NAME} is larger than {MANIFEST_MAX_BYTES >> 20} MiB; "
                          "re-export the bundle")
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, over-long ints, absurd nesting
        raise BundleError(
            f"bundle {path}: {MANIFEST_NAME} is not valid JSON ({one_line(e, 120)}); re-export the bundle"
        ) from e
    if not isinstance(manifest, dict):
        raise BundleError(f"bundle {path}: {MANIFEST_NAME} is not a JSON object; re-export the bundle")
    version = manifest.get("manifest_version")
    if version != MANIFEST_VERSION or isinstance(version, bool):
        raise BundleError(
            f"bundle {path}: manifest_version {show_name(version, 40)} is not supported (this edgegate reads "
            f"{MANIFEST_VERSION}); upgrade edgegate or re-export the bundle"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"bundle {path}: {MANIFEST_NAME} has no 'files' table; re-export the bundle")
    for key, kind in (("target", str), ("target_options", dict)):
        if key in manifest and not isinstance(manifest[key], kind):
            raise BundleError(f"bundle {path}: {key!r} in {MANIFEST_NAME} is not a {kind.__name__}; "
                              "re-export the bundle")
    return manifest


def _check_files(path: Path, files: dict[str, Any], verify: bool) -> None:
    for name, entry in files.items():
        check_name(name, f"bundle {path}")
        if name == MANIFEST_NAME:
            raise BundleError(f"bundle {path}: {MANIFEST_NAME} lists itself; re-export the bundle")
        size = entry.get("bytes") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not (isinstance(digest, str) and _SHA256.match(digest)):
            raise BundleError(f"bundle {path}: manifest entry for {name} has no sha256; re-export the bundle")
        if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
            raise BundleError(f"bundle {path}: manifest entry for {name} has no byte count; re-export the bundle")
        fp = path / name
        if fp.is_symlink() or not fp.is_file():
            raise BundleError(
                f"bundle {path}: file {name} listed in {MANIFEST_NAME} is missing or not a regular file; "
                "re-export the bundle"
            )
        if verify and (fp.stat().st_size != size or sha256_file(fp) != digest):
            raise BundleError(
                f"bundle {path}: file {name} does not match its sha256 in {MANIFEST_NAME} "
                "(modified or corrupt); re-export the bundle"
            )


def _check_unlisted_links(path: Path) -> None:
    # Files the manifest does not list are ignored, but a link out of the bundle could still be
    # reached by name (e.g. as ONNX external data), so refuse those.
    root = path.resolve()
    for entry in path.iterdir():
        if not entry.is_symlink():
            continue
        try:
            inside = is_inside(entry.resolve(), root)
        except RuntimeError:  # a link loop
            inside = False
        if not inside:
            raise BundleError(f"bundle {path}: {show_name(entry.name)} is a link pointing outside the bundle; "
                              "remove it")
