"""The real CLI in a subprocess, as a user runs it: shared by the end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def edgegate(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``edgegate ARGS...`` run in ``cwd`` with a wide terminal, output captured as text."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "edgegate.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=timeout)
