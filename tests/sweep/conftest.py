"""Sweep fixtures: two zoo models trained once, the environment Ray runs in, and a two-node Ray cluster on
loopback (a head and a worker, each `ray start --num-cpus 1`) shared by the cluster tests.

Ray's token authentication is on (its default): every process gets one fresh token through the
environment, so nothing is written to the home folder. The cluster is torn down by process id (every
process whose command line names the cluster's temp dir, and their children), never with `ray stop`,
which would stop every Ray on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgegate import zoo
from tests.sweep._sweep import PROC, cmdline, pids_naming, stop_tree


@pytest.fixture(scope="session")
def sweep_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with threshold_gate as tg.pt and early_exit as ee.pt (zoo checkpoints)."""
    folder = tmp_path_factory.mktemp("sweep-models")
    zoo.train_and_save("threshold_gate", folder / "tg.pt")
    zoo.train_and_save("early_exit", folder / "ee.pt")
    return folder


@pytest.fixture(scope="session")
def ray_env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "200"}


# --------------------------------------------------------------------------------------------- cluster


@dataclass(frozen=True)
class Cluster:
    address: str
    worker_raylet: int  # pid of the worker node's raylet: the cells it runs are its children
    env: dict[str, str]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(ray_env: dict[str, str]) -> Iterator[Cluster]:
    if not PROC.is_dir():
        pytest.skip("the cluster tests find Ray's processes in /proc (Linux)")
    # Short: Ray's unix sockets live under it (at most ~107 bytes per path).
    tmp = tempfile.mkdtemp(prefix="eg-ray-")
    port = _free_port()
    ray = [sys.executable, "-m", "ray.scripts.scripts", "start", "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
           "--disable-usage-stats"]
    try:
        r = subprocess.run([*ray, "--head", "--port", str(port), "--include-dashboard=false", "--temp-dir", tmp],
                           env=ray_env, cwd=tmp, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-2000:]
        head = [p for p in pids_naming(tmp) if "/raylet" in cmdline(p).split(" ", 1)[0]]
        r = subprocess.run([*ray, "--address", f"127.0.0.1:{port}"], env=ray_env, cwd=tmp, capture_output=True,
                           text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-2000:]
        worker = [p for p in pids_naming(tmp) if "/raylet" in cmdline(p).split(" ", 1)[0] and p not in head]
        assert len(head) == 1 and len(worker) == 1, (head, worker)
        yield Cluster(f"127.0.0.1:{port}", worker[0], ray_env)
    finally:
        stop_tree(pids_naming(tmp))
        shutil.rmtree(tmp, ignore_errors=True)
