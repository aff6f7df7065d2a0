"""Durable file system writes shared by the stages that write files (checkpoints, bundles): standard library only.

Input: a directory or nothing. Output: the process umask; a directory entry made durable; a scratch write's
failure naming its file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


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


@contextlib.contextmanager
def scratch_write(path: str | os.PathLike[str]) -> Iterator[None]:
    """Writes of a scratch file at ``path`` (a model copy for the checker or a timing trial) inside the block: an
    OSError without a file name (a full disk, a file size limit) gets ``path`` and what to do, so the one-line
    error names the file."""
    try:
        yield
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, f"{e.strerror or e} writing a scratch copy of the model (set TMPDIR to a disk "
                      "with room)", os.fspath(path)) from e
