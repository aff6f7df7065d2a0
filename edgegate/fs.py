"""Durable file system writes shared by the stages that write files (checkpoints, bundles): standard library only.

Input: a directory or nothing. Output: the process umask; a directory entry made durable.
"""

from __future__ import annotations

import os
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
