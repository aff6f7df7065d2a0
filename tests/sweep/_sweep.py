"""Helpers of the sweep tests: the CLI with Ray's environment, specs beside the models, processes in /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PROC = Path("/proc")


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``edgegate ARGS...`` as a user runs it, output captured as text."""
    return subprocess.run([sys.executable, "-m", "edgegate.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def write_spec(folder: Path, models: Path, body: str, name: str = "spec.toml") -> Path:
    """A spec in `folder` whose models are in `models` (paths relative to the spec, as users write them)."""
    rel = os.path.relpath(models, folder)
    path = folder / name
    path.write_text(body.replace("MODELS/", f"{rel}/"))
    return path


# ------------------------------------------------------------------------------------------- processes


def cmdline(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (field 4, ppid, is [1]; 22, start time, is [19])."""
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def children(pid: int) -> list[int]:
    out = []
    for d in PROC.iterdir():
        if d.name.isdigit():
            stat = _stat(int(d.name))
            if stat is not None and int(stat[1]) == pid:
                out.append(int(d.name))
    return out


def pids_naming(text: str) -> list[int]:
    return [int(d.name) for d in PROC.iterdir() if d.name.isdigit() and text in cmdline(int(d.name))]


def stop_tree(pids: list[int]) -> None:
    """SIGTERM `pids` and all their descendants, then SIGKILL what is still alive."""
    _stop(_tree(pids))


def _tree(pids: list[int]) -> list[int]:
    seen: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo += children(pid)
    return seen


def _stop(pids: list[int]) -> None:
    # A pid is signalled only while it is the process we found (same start time): never a reused pid.
    found = {p: stat[19] for p in pids if (stat := _stat(p)) is not None}

    def alive() -> list[int]:
        return [p for p, t in found.items() if (stat := _stat(p)) is not None and stat[19] == t
                and "zombie" not in _state(p)]

    # Ray's GCS and monitor can take over 10 s to honour SIGTERM; a test cluster keeps nothing worth waiting for.
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        for p in alive():
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and alive():
            time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return (PROC / str(pid) / "status").read_text().split("State:", 1)[1].split("\n", 1)[0].lower()
    except (OSError, IndexError):
        return "zombie"
