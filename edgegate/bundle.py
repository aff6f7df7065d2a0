"""Stage 7, bundle: a target's files + a manifest -> a verified bundle directory, and back (DESIGN.md §8).

Input: file contents (bytes or paths) and a manifest dict. Output: a directory holding
``manifest.json`` (with per-file sha256 and byte counts), ``model.onnx``, target files and
``golden_io.npz``, written to a temp dir beside the destination, fsynced and renamed into place, so
a reader never sees half a bundle. Overwriting replaces only a verified bundle that holds nothing but
its listed files (`check_replaceable`): never a plain file, a link, the current directory, a directory
holding the input, or any other directory. `read_bundle` checks it (manifest shape, plain file names, every
file's size and sha256, ONNX external data confined to the bundle) and returns a `Bundle`.

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
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path, PureWindowsPath
from typing import Any

from edgegate.errors import BundleError, one_line, os_error_text
from edgegate.onnx_safety import check_locations, check_onnx_external_data, external_data_locations, is_inside

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "Bundle",
    "check_destination",
    "check_replaceable",
    "check_onnx_external_data",
    "external_data_locations",
    "read_bundle",
    "sha256_file",
    "write_bundle",
]

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
# A manifest is a few KiB; refuse to parse anything absurd before reading it into memory.
MANIFEST_MAX_BYTES = 16 << 20
_CHUNK = 1 << 20
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
    """Write `files` and `manifest` as the bundle directory `dest`, atomically; return its path.

    An ONNX file among `files` may keep tensors in external data only in other files of the bundle.
    """
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
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise BundleError(
                f"bundle {dest} already exists; pass overwrite=True (--overwrite) or choose another path"
            )
        check_replaceable(dest)  # never delete what is not a bundle we wrote (the input, the user's files)
    manifest = dict(manifest)  # never mutate the caller's dict
    tmp: Path | None = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Same directory as dest: the final rename stays on one filesystem and is atomic.
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        entries = {name: _write_file(tmp / name, src) for name, src in files.items()}
        _check_external_data(tmp, entries, f"cannot write bundle {dest}")
        manifest["files"] = entries
        manifest["manifest_version"] = MANIFEST_VERSION
        try:
            text = json.dumps(manifest, sort_keys=True, indent=2) + "\n"
        except (TypeError, ValueError) as e:
            raise BundleError(f"cannot write bundle {dest}: manifest is not JSON-serializable ({e})") from e
        _write_file(tmp / MANIFEST_NAME, text.encode())
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; a bundle gets normal directory rights
        fsync_dir(tmp)
        _move_into_place(tmp, dest)
        tmp = None
        fsync_dir(dest.parent)
    except OSError as e:
        raise BundleError(f"cannot write bundle {dest}: {os_error_text(e)}; check free space and permissions") from e
    finally:
        # Runs on every exit, KeyboardInterrupt included: no half-written temp dir is left behind.
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def check_destination(
    dest: str | os.PathLike[str], overwrite: bool = False, keep: Iterable[str | os.PathLike[str]] = ()
) -> None:
    """Refuse, before any long work, a bundle destination that `write_bundle` could not or must not write.

    `dest` must not exist, or with `overwrite` must be an edgegate bundle that may be replaced (see
    `check_replaceable`; `keep`: paths, such as the input model, that must not be inside it). Its nearest
    existing ancestor must be a directory we may create entries in.
    """
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        check_replaceable(dest, keep)
        if not overwrite:
            raise BundleError(f"bundle {dest} already exists; pass --overwrite to replace it or choose another -o")
    parent = dest.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise BundleError(f"cannot write bundle {dest}: {parent} is not a directory; choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BundleError(f"cannot write bundle {dest}: {parent} is not writable (permission denied or "
                          "read-only filesystem); choose another -o")


def check_replaceable(dest: str | os.PathLike[str], keep: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Raise unless the existing `dest` is an edgegate bundle that replacing would lose nothing of.

    That is: a real directory (not a link, not the current directory or one above it), not holding any
    path of `keep`, whose manifest verifies (every listed file present with its sha256) and which holds
    nothing the manifest does not list. Anything else may be the user's own work, so it is never deleted.
    """
    dest = Path(dest)
    refuse = f"edgegate replaces only a bundle it wrote: choose another -o or remove {dest} yourself"
    if dest.is_symlink():
        raise BundleError(f"{dest} already exists and is a link, not a bundle directory; {refuse}")
    if not dest.is_dir():
        raise BundleError(f"{dest} already exists and is a file, not a bundle directory; {refuse}")
    here, target = Path.cwd().resolve(), dest.resolve()
    if is_inside(here, target):
        raise BundleError(f"-o {dest} is the current directory or contains it, not a bundle of its own; "
                          "choose another -o such as out.edgegate")
    for path in keep:
        if is_inside(Path(path).resolve(), target):
            raise BundleError(f"{dest} holds the input {path}; edgegate never replaces a directory that holds "
                              "its input: choose another -o")
    if not (dest / MANIFEST_NAME).is_file():
        raise BundleError(f"{dest} already exists and is not an edgegate bundle (no {MANIFEST_NAME}); {refuse}")
    try:
        bundle = read_bundle(dest)
    except BundleError as e:
        raise BundleError(f"{dest} already exists but does not verify as an edgegate bundle "
                          f"(`edgegate inspect {dest}` says why); {refuse}") from e
    listed = {MANIFEST_NAME, *bundle.files}
    extra = sorted(p.name for p in dest.iterdir() if p.name not in listed)
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise BundleError(f"bundle {dest} also holds {_show(extra[0])}{more}, which is not part of the bundle; "
                          f"move it out first, or choose another -o")


def _write_file(path: Path, src: bytes | bytearray | memoryview | os.PathLike[str]) -> dict[str, Any]:
    try:
        return _copy_hashing(path, src)
    except OSError as e:
        if e.filename is None:  # write() and fsync() failures (disk full) do not say which file
            e.filename = path.name
        raise


def _copy_hashing(path: Path, src: bytes | bytearray | memoryview | os.PathLike[str]) -> dict[str, Any]:
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
    # Overwrite (of a bundle `check_replaceable` accepted): move the old bundle aside, rename the new one
    # in, then delete the old one, so a crash in between leaves either bundle intact under some name.
    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def umask() -> int:
    """The process umask (files we create get the rights the user's umask gives, not mkstemp's 0600)."""
    mask = os.umask(0)  # the only portable way to read it is to set it and put it back
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in directory `path` durable (POSIX; a no-op on Windows)."""
    if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open a directory for fsync
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _check_name(name: object, context: str) -> None:
    """Bundle file names are plain names in the bundle folder: no folders, `..`, absolute paths or controls."""
    if not is_plain_name(name):
        raise BundleError(
            f"{context}: file name {_show(name)} must be a plain file name (no folders, '..', or '/')"
        )


def _check_external_data(path: Path, files: Mapping[str, Any], context: str) -> None:
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
                    f"{context}: external data {_show(location)} of {name} is not listed in "
                    f"{MANIFEST_NAME}, so it cannot be verified; re-export the bundle"
                )


def _show(text: object, limit: int = 200) -> str:
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
    _check_external_data(path, manifest["files"], f"bundle {path}")
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
            f"bundle {path}: manifest_version {_show(version, 40)} is not supported (this edgegate reads "
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
        _check_name(name, f"bundle {path}")
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
            raise BundleError(f"bundle {path}: {_show(entry.name)} is a link pointing outside the bundle; "
                              "remove it")
