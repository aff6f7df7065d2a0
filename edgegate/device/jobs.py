"""The agent's work folder and queue: one measurement at a time, bounded, in arrival order.

Input: the ``--workdir`` folder and the queue bounds. Output: `Workdir`, which makes one job folder per
upload (marked as the agent's own, removed after the request) and at start-up removes the job folders
an earlier agent left (killed mid-measurement) — only folders it can prove it made, never anything else
in the work folder; and `MeasureQueue`, a FIFO that admits a bounded number of jobs overall and per
client and lets one run at a time, so two clients never share the device while one is timed.

Runtime side: standard library only.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from edgegate.device.protocol import DeviceError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
from edgegate.errors import os_error_text

log = logging.getLogger(__name__)

JOB_PREFIX = "edgegate-job-"
MARKER = ".edgegate-agent-job"  # inside each job folder; uploads land one level below, so never forged


class QueueFull(DeviceError):
    """The queue is at its bound (overall: 503, for this client: 429)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------- workdir


class Workdir:
    """The agent's folder: private (no group/other write), holding only the agent's job folders."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()
        try:
            if self.path.is_symlink():
                raise DeviceError(f"workdir {self.path} is a link; give the agent a real folder")
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = self.path.stat()
        except OSError as e:
            raise DeviceError(f"workdir {self.path} cannot be created: {os_error_text(e)}") from e
        if not stat.S_ISDIR(st.st_mode):
            raise DeviceError(f"workdir {self.path} is not a folder; choose another --workdir")
        if os.name == "posix" and st.st_mode & 0o022:
            # In a folder others can write, another user could plant or swap files in a job folder.
            raise DeviceError(f"workdir {self.path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                              "choose a private folder (chmod 700) for --workdir")

    def lock(self) -> None:
        """Hold the folder for this agent (released at exit): a second agent would remove our job folders."""
        if fcntl is None:  # Windows: no flock; one agent per folder is then the user's to keep
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # on the folder itself: no lock file to leave behind
        except OSError:
            os.close(fd)
            raise DeviceError(f"workdir {self.path} is in use by another device agent; give this one another "
                              "--workdir") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            os.close(fd)

    def clean(self) -> list[str]:
        """Remove job folders an earlier agent left behind; return their names. Nothing else is touched."""
        removed = []
        for entry in sorted(self.path.iterdir()):
            if (entry.name.startswith(JOB_PREFIX) and not entry.is_symlink() and entry.is_dir()
                    and (entry / MARKER).is_file() and not (entry / MARKER).is_symlink()):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        return removed

    @contextlib.contextmanager
    def job(self) -> Iterator[Path]:
        """A fresh job folder, removed (with whatever was written into it) when the block ends."""
        path = Path(tempfile.mkdtemp(prefix=JOB_PREFIX, dir=self.path))
        try:
            (path / MARKER).write_text(f"made by the edgegate device agent (pid {os.getpid()})\n")
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():  # e.g. a file the worker still held open on a filesystem that refuses
                log.warning("could not remove job folder %s; the next start of the agent removes it", path)


# --------------------------------------------------------------------------------------------- queue


class MeasureQueue:
    """First come, first served; at most `total` jobs admitted (running + waiting), `per_client` each."""

    def __init__(self, total: int, per_client: int, max_wait_s: float) -> None:
        self.total, self.per_client, self.max_wait_s = total, per_client, max_wait_s
        self._cond = threading.Condition()
        self._waiting: collections.deque[int] = collections.deque()
        self._running: int | None = None
        self._per: collections.Counter[str] = collections.Counter()
        self._tickets = itertools.count()
        self._closed = False

    def state(self) -> dict[str, int]:
        with self._cond:
            return {"running": int(self._running is not None), "waiting": len(self._waiting)}

    @contextlib.contextmanager
    def turn(self, client: str) -> Iterator[float]:
        """Wait for this client's turn (yields the seconds waited); refuses at once when over a bound."""
        with self._cond:
            admitted = len(self._waiting) + (self._running is not None)
            if self._closed:
                raise QueueFull("the agent is stopping; retry when it is back", 503)
            if admitted >= self.total:
                raise QueueFull(f"the agent's queue is full ({admitted} jobs); retry later", 503)
            if self._per[client] >= self.per_client:
                raise QueueFull(f"{client} already has {self._per[client]} jobs queued (the agent's bound per "
                                "client); wait for them to finish", 429)
            ticket = next(self._tickets)
            self._waiting.append(ticket)
            self._per[client] += 1
            start = time.monotonic()
            deadline = start + self.max_wait_s
            try:
                while self._running is not None or self._waiting[0] != ticket:
                    if self._closed:
                        raise QueueFull("the agent is stopping; retry when it is back", 503)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise QueueFull(f"waited {self.max_wait_s:g} s in the agent's queue without a turn; "
                                        "retry later", 503)
                    self._cond.wait(left)
            except BaseException:
                self._waiting.remove(ticket)
                self._release_client(client)
                raise
            self._waiting.popleft()
            self._running = ticket
        try:
            yield time.monotonic() - start
        finally:
            with self._cond:
                self._running = None
                self._release_client(client)

    def close(self, seconds: float) -> bool:
        """Admit nothing more, send the waiting away, and wait up to `seconds` for the running job to end."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._running is None and not self._waiting, timeout=seconds)

    def _release_client(self, client: str) -> None:
        self._per[client] -= 1
        if self._per[client] <= 0:
            del self._per[client]
        self._cond.notify_all()
