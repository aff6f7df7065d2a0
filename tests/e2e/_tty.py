"""The real CLI on a terminal: a child whose stdout and/or stderr is a pseudo-terminal, as in a user's shell."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def on_terminal(*args: str, cwd: Path, timeout: float = 300) -> tuple[int, str, str]:
    """``edgegate ARGS...`` with stdout and stderr each on its own pty; (exit code, stdout, stderr) as raw text."""
    masters, slaves = zip(*(pty.openpty() for _ in range(2)), strict=True)
    env = {**os.environ, "COLUMNS": "80", "ORT_DISABLE_TELEMETRY": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgegate.cli", *args], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=slaves[0], stderr=slaves[1])
    for fd in slaves:
        os.close(fd)
    try:
        code = proc.wait(timeout=timeout)
        return code, *(read_all(fd) for fd in masters)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for fd in masters:
            os.close(fd)


def read_all(fd: int) -> str:
    """Everything a pty master holds once its child exited (EIO marks the end on Linux)."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


def screen_lines(text: str) -> list[str]:
    """The lines a terminal shows: escape sequences dropped, a carriage return restarts the line."""
    lines = []
    for line in ANSI.sub("", text).replace("\r\n", "\n").split("\n"):
        lines.append(line.rsplit("\r", 1)[-1])
    return lines
