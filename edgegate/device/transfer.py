"""Bundle transfer: a bundle directory -> an uncompressed tar stream, and a tar stream -> files, safely.

Input (client): a bundle directory, read with ``read_bundle(verify=False)`` so only the manifest and
the files it lists travel. Output: a tar of plain names (no folders) in a temporary file.

Input (agent): the request body as a file-like object that raises `TransferError` when the client is
too slow or stops early, a fresh destination folder and `TransferLimits`. Output: the files, written
while the stream is read (nothing is buffered whole). Refused: anything but a regular file (links,
devices, folders, sparse files), a name that is not a plain file name, a name twice, more files or
bytes than the limits allow, a body that is not a tar or ends early. The tar's own modes, owners and
times are ignored. The caller removes the destination folder on any error.

Runtime side: standard library only.
"""

from __future__ import annotations

import dataclasses
import os
import tarfile
import tempfile
from pathlib import Path
from typing import IO, Protocol

from edgegate.bundle import MANIFEST_NAME, read_bundle
from edgegate.device.protocol import DeviceError, check_plain_name
from edgegate.errors import one_line

_CHUNK = 1 << 20


class TransferError(DeviceError):
    """An upload is malformed, truncated, too slow or over a limit; ``status`` is the HTTP answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class TransferLimits:
    max_bytes: int = 512 << 20  # whole upload (the request body)
    max_files: int = 64  # a bundle has a handful: manifest, model, engine, golden, a few target files
    seconds: float = 120.0  # to receive the whole upload, once the agent starts reading it


class Body(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


# -------------------------------------------------------------------------------------------- client


def pack_bundle(path: str | os.PathLike[str]) -> tuple[IO[bytes], int, str]:
    """(tar in a temporary file positioned at 0, its size, the bundle's folder name) for an upload.

    Only ``manifest.json`` and the files it lists are packed; the agent verifies their sha256. The
    temporary file disappears when closed.
    """
    bundle = read_bundle(path, verify=False)  # names, links, external data; the agent checks sha256
    name = Path(path).resolve().name
    out = tempfile.TemporaryFile(prefix="edgegate-upload-")
    try:
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for file in (MANIFEST_NAME, *bundle.files):
                src = bundle.path / file
                info = tarfile.TarInfo(file)
                info.size = src.stat().st_size
                info.mode = 0o644
                with open(src, "rb") as f:
                    tar.addfile(info, f)  # reads exactly info.size bytes, or raises if the file shrank
        size = out.tell()
        out.seek(0)
    except BaseException:
        out.close()
        raise
    return out, size, name


# --------------------------------------------------------------------------------------------- agent


def extract_stream(body: Body, dest: Path, limits: TransferLimits) -> list[str]:
    """Write the regular files of the tar read from `body` into the new folder `dest`; their names.

    `body` must stop at the request's end (the agent's reader does). Any refusal raises
    `TransferError`; what was written so far stays in `dest` for the caller to remove.
    """
    dest.mkdir(mode=0o700)
    names: list[str] = []
    total = 0
    try:
        with tarfile.open(fileobj=body, mode="r|") as tar:  # "r|": a stream, uncompressed only
            for member in tar:
                _check_member(member, names, limits)
                total += member.size
                if total > limits.max_bytes:
                    raise TransferError(f"upload holds more than {limits.max_bytes} bytes of files", 413)
                source = tar.extractfile(member)
                assert source is not None  # a regular file, checked above
                _copy(source, dest / member.name, member.size)
                names.append(member.name)
    except TransferError:
        raise
    except (tarfile.TarError, EOFError, UnicodeError, ValueError, OverflowError) as e:
        # Everything tarfile raises on a damaged header, a bad PAX record or a short member.
        raise TransferError(f"upload is not a valid uncompressed tar of the bundle ({one_line(e, 120)})") from e
    if not names:
        raise TransferError("upload holds no files; send the bundle's manifest.json and the files it lists")
    return names


def _check_member(member: tarfile.TarInfo, seen: list[str], limits: TransferLimits) -> None:
    try:
        name = check_plain_name(member.name, "tar member")
    except DeviceError as e:
        raise TransferError(f"{e}; the upload must hold the bundle's files at top level") from None
    if not member.isreg() or member.issparse():
        kind = "link" if member.issym() or member.islnk() else "folder" if member.isdir() else "special file"
        raise TransferError(f"tar member {name!r} is a {kind}; only regular files are accepted")
    if name in seen:
        raise TransferError(f"tar member {name!r} appears twice; send each file once")
    if len(seen) >= limits.max_files:
        raise TransferError(f"upload holds more than {limits.max_files} files", 413)
    if member.size < 0:
        raise TransferError(f"tar member {name!r} has a negative size")


def _copy(source: IO[bytes], path: Path, size: int) -> None:
    # "xb": the folder is fresh and each name new, so nothing existing is ever overwritten or followed.
    with open(path, "xb") as out:
        left = size
        while left:
            chunk = source.read(min(left, _CHUNK))
            if not chunk:
                raise TransferError(f"upload ends inside {path.name}: the tar is truncated")
            out.write(chunk)
            left -= len(chunk)
