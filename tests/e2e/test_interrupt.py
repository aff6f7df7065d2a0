"""An export interrupted mid-calibration (SIGTERM or SIGINT to the real CLI) exits 130 and leaves nothing.

The CLI shows its current step on stderr when that is a terminal, so the child's stderr is a
pseudo-terminal: the test waits until the export shows ``calibrate`` and only then sends the signal.
"""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.e2e._tty import read_all, screen_lines


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("interrupt")
    r = subprocess.run([sys.executable, "-m", "edgegate.cli", "zoo", "train", "threshold_gate", "-o", "m.pt"],
                       cwd=work, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return work / "m.pt"


def _default_sigint() -> None:
    # A child of a non-interactive shell may inherit SIGINT ignored, and then Python keeps ignoring it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_interrupted_export_exits_130_and_leaves_nothing(model: Path, tmp_path: Path, sig: signal.Signals) -> None:
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    (work / "m.pt").write_bytes(model.read_bytes())
    env = {**os.environ, "COLUMNS": "120", "TMPDIR": str(tmp),
           "ORT_DISABLE_TELEMETRY": "1"}  # onnxruntime would otherwise drop a telemetry file in TMPDIR
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgegate.cli", "export", "m.pt", "--quant", "int8", "-o", "out.edgegate"],
        cwd=work, env=env, stdout=subprocess.PIPE, stderr=slave, preexec_fn=_default_sigint,
    )
    os.close(slave)
    calibrating = threading.Event()
    seen: list[bytes] = []

    def watch() -> None:
        while not calibrating.is_set():
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child exited
                return
            if not chunk:
                return
            seen.append(chunk)
            if b"export: calibrate" in b"".join(seen[-2:]):
                calibrating.set()

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    try:
        assert calibrating.wait(timeout=300), b"".join(seen)[-500:]
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    err = b"".join(seen).decode() + read_all(master)
    os.close(master)
    assert code == 130, err
    shown = [line for line in screen_lines(err) if line.strip()]
    assert shown[-1] == "edgegate: interrupted; nothing was written", err
    assert "Traceback" not in err
    assert sorted(p.name for p in work.iterdir()) == ["m.pt"]  # no bundle, no .out.edgegate.*.tmp beside it
    # The compile workdir is gone; torch's own compile cache (made when brevitas imports it) may stay.
    assert [p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_")] == []
