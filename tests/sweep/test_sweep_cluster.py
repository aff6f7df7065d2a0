"""`edgegate sweep --ray-address` on a two-node Ray cluster on loopback (head + worker, `ray start`):
a failing cell is an error row while the others finish (their bench done by a real device agent on
loopback, `edgegate device serve`); a worker process killed mid-cell gets its cell retried and no
bundle is half-written; Ctrl-C exits 130 keeping finished cells, and --resume finishes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgegate.bundle import read_bundle
from tests.sweep._sweep import children, cmdline, run, write_spec

CELL_TITLE = "ray::sweep_cell"  # Ray names a worker process after the task it runs
TOKEN = "sweep-device-token-0123456789abcdef"


@pytest.fixture(scope="module")
def device_agent(tmp_path_factory: pytest.TempPathFactory, ray_env: dict[str, str]) -> Iterator[tuple[str, Path]]:
    """`edgegate device serve` on loopback (port 0: its URL is on its first line); (URL, token file)."""
    root = tmp_path_factory.mktemp("agent")
    token = root / "agent.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    cmd = [sys.executable, "-m", "edgegate.cli", "device", "serve", "--port", "0", "--token-file", str(token),
           "--workdir", str(root / "work"), "--name", "sweep-device"]
    with open(root / "agent.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=ray_env, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"serving (http://127\.0\.0\.1:\d+) ", line)
        assert match, (line, (root / "agent.log").read_text())
        yield match.group(1), token
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, (root / "agent.log").read_text()


def _leftovers(out: Path) -> list[str]:
    """Temp dirs/files of interrupted writes (write_bundle's `.bundle.*.tmp`, JSON's `.*.tmp`)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*") if p.name.endswith(".tmp") or ".old-" in p.name)


def _check_bundles(out: Path, rows: list[dict]) -> None:
    for row in rows:
        if row["status"] == "ok":
            assert read_bundle(out / row["bundle"]).manifest["quant"]["scheme"] == row["cell"]["quant"]


def _default_sigint() -> None:
    # A child of a non-interactive shell may inherit SIGINT ignored, and then Python keeps ignoring it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _popen(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgegate.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_sigint)


@pytest.mark.slow  # a two-node Ray cluster per module: `python -m pytest -m slow`
def test_failing_cell_is_an_error_row_and_the_rest_finish(ray_cluster, sweep_models: Path, tmp_path: Path,
                                                          device_agent: tuple[str, Path]) -> None:
    # tg2.pt is tg.pt under another name: the same cells by content, run once and shown under both names.
    (tmp_path / "tg2.pt").write_bytes((sweep_models / "tg.pt").read_bytes())
    url, token = device_agent
    (tmp_path / "agent.token").write_bytes(token.read_bytes())
    (tmp_path / "agent.token").chmod(0o600)
    write_spec(tmp_path, sweep_models, f"""
models = ["MODELS/tg.pt", "tg2.pt"]
targets = ["snn"]
[options]
snn = {{ timesteps = [8, 0] }}   # 0 is refused by the snn target, in its cell only
[bench]
runs = 10
[device]                        # every bench on the agent; accuracy still measured on the Ray nodes
url = "{url}"
token_file = "agent.token"
""")
    r = run(["sweep", "spec.toml", "-o", "out", "--ray-address", ray_cluster.address], tmp_path, ray_cluster.env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["summary"] == {"cells": 4, "ok": 2, "error": 2, "pending": 0, "cached": 0}
    assert sweep["ray"]["nodes"] == 2 and sweep["ray"]["cpus"] == 2 and sweep["ray"]["address"] == ray_cluster.address
    ok, bad, ok2, bad2 = sweep["rows"]
    assert (ok["name"], ok["status"], ok["cell"]["options"]) == ("tg/snn/fp32/timesteps=8", "ok", {"timesteps": "8"})
    assert ok["latency"]["median_ms"] > 0 and 0.8 <= ok["metrics"]["accuracy"] <= 1.0
    assert ok["device"] == {"name": "sweep-device", "url": url} and ok["cell"]["device"] == url
    assert ok["bench_s"] > 0 and ok["throughput"] > 0
    assert TOKEN not in (out / "sweep.json").read_text()  # the spec records the token file, not the token
    assert sweep["spec"]["device"] == {"url": url, "token_file": str(tmp_path / "agent.token")}
    assert bad["name"] == "tg/snn/fp32/timesteps=0" and bad["status"] == "error"
    assert bad["error"] == "export: snn option timesteps=0 must be an int in 1..65535"
    assert bad["bundle"] is None and bad["node"]["ip"] and bad["node"]["id"] != ok["node"]["id"]  # SPREAD
    assert not (out / "cells" / bad["key"][:20] / "bundle").exists()
    for first, twin in ((ok, ok2), (bad, bad2)):  # one task answered both names
        assert twin["name"] == first["name"].replace("tg/", "tg2/", 1) and twin["cell"]["model"] == "tg2.pt"
        assert (twin["key"], twin["node"], twin["status"], twin["error"]) == (
            first["key"], first["node"], first["status"], first["error"])
    assert "2 ok, 2 error" in r.stdout and "error: export: snn option timesteps=0" in r.stdout
    _check_bundles(out, sweep["rows"])
    assert _leftovers(out) == []


@pytest.mark.slow  # a two-node Ray cluster per module: `python -m pytest -m slow`
def test_worker_killed_mid_cell_is_retried(ray_cluster, sweep_models: Path, tmp_path: Path) -> None:
    write_spec(tmp_path, sweep_models, """
models = ["MODELS/tg.pt"]
quant = ["fp32", "int8"]
[bench]
runs = 10
[ray]
max_retries = 2
""")
    proc = _popen(["sweep", "spec.toml", "-o", "out", "--ray-address", ray_cluster.address], tmp_path,
                  ray_cluster.env)
    victim = None
    try:
        deadline = time.monotonic() + 240
        while victim is None and time.monotonic() < deadline and proc.poll() is None:
            # A cell running on the worker node: a child of that node's raylet, titled after the task.
            victim = next((p for p in children(ray_cluster.worker_raylet) if cmdline(p).startswith(CELL_TITLE)), None)
            time.sleep(0.05)
        assert victim is not None, "no cell ran on the worker node"
        time.sleep(1.0)  # into the cell's work (its first second imports torch and the exporter)
        assert cmdline(victim).startswith(CELL_TITLE), "the cell ended before it could be killed"
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    out = tmp_path / "out"
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["summary"] == {"cells": 2, "ok": 2, "error": 0, "pending": 0, "cached": 0}, sweep["rows"]
    assert victim not in {row["node"]["pid"] for row in sweep["rows"]}  # the killed cell ran again elsewhere
    _check_bundles(out, sweep["rows"])
    assert _leftovers(out) == []
    assert "2 cells: 2 ok, 0 error" in stdout


@pytest.mark.slow  # a two-node Ray cluster per module: `python -m pytest -m slow`
def test_interrupt_keeps_finished_cells_and_resume_finishes(ray_cluster, sweep_models: Path, tmp_path: Path) -> None:
    write_spec(tmp_path, sweep_models, """
models = ["MODELS/tg.pt"]
quant = ["fp32", "int8"]
observer = ["percentile", "minmax"]
[bench]
runs = 10
""")
    proc = _popen(["sweep", "spec.toml", "-o", "out", "--ray-address", ray_cluster.address], tmp_path,
                  ray_cluster.env)
    out = tmp_path / "out"
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("cells/*/row.json")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert list(out.glob("cells/*/row.json")), "no cell finished"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["status"] == "interrupted"
    finished = sweep["summary"]["ok"]
    assert finished >= 1 and sweep["summary"]["pending"] == 3 - finished and sweep["summary"]["error"] == 0
    assert stderr.strip().splitlines()[-1] == (
        f"edgegate: interrupted; {finished} finished cells are kept in out (run the sweep again, or "
        "`edgegate sweep --resume -o out`, to do the rest)")
    assert _leftovers(out) == []
    for bundle in out.glob("cells/*/bundle"):  # finished or not, a bundle on disk is whole
        read_bundle(bundle)

    (tmp_path / "spec.toml").unlink()  # --resume reads the spec from out/sweep.json
    r = run(["sweep", "--resume", "-o", "out", "--ray-address", ray_cluster.address], tmp_path, ray_cluster.env)
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["summary"] == {"cells": 3, "ok": 3, "error": 0, "pending": 0, "cached": finished}
    assert sweep["status"] == "complete"
    _check_bundles(out, sweep["rows"])
    assert _leftovers(out) == []


def test_a_device_that_refuses_the_token_stops_the_sweep_before_it_starts(sweep_models: Path, tmp_path: Path,
                                                                          device_agent: tuple[str, Path],
                                                                          ray_env: dict[str, str]) -> None:
    url, _ = device_agent
    (tmp_path / "wrong.token").write_text("not-the-agents-token-000\n")
    (tmp_path / "wrong.token").chmod(0o600)
    write_spec(tmp_path, sweep_models, f'models = ["MODELS/tg.pt"]\n[device]\nurl = "{url}"\n'
                                       'token_file = "wrong.token"\n')
    r = run(["sweep", "spec.toml", "-o", "out"], tmp_path, ray_env)
    assert r.returncode == 2 and r.stderr.startswith("edgegate: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.strip() == (f"edgegate: error: the device agent at {url} refused: wrong token: use the token "
                                "file the agent was started with (HTTP 401)")
    assert not (tmp_path / "out").exists()  # refused before anything was written or any Ray started
