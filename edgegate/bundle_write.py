"""Stage 7, bundle: a target's files + a manifest -> a verified bundle directory, written atomically (DESIGN.md §8).

Input: file contents (bytes or paths) and a manifest dict. Output: a directory holding ``manifest.json`` (with
per-file sha256 and byte counts), ``model.onnx``, target files and ``golden_io.npz``, written to a temp dir beside
the destination, fsynced and renamed into place, so a reader never sees half a bundle. Overwriting replaces only a
verified bundle that holds nothing but its listed files (`check_replaceable`): never a plain file, a link, the
current directory, a directory holding the input, or any other directory. Reading and verifying: `edgegate.bundle`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from edgegate.bundle import (
    HASH_CHUNK,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    check_external_data,
    check_name,
    read_bundle,
    show_name,
)
from edgegate.errors import BundleError, os_error_text
from edgegate.fs import fsync_dir, umask
from edgegate.onnx_safety import is_inside


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
        check_name(name, f"cannot write bundle {dest}")
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
        check_external_data(tmp, entries, f"cannot write bundle {dest}")
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
        raise BundleError(f"bundle {dest} also holds {show_name(extra[0])}{more}, which is not part of the bundle; "
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
                for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
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
