"""The device agent as users run it: a real ``edgegate device serve`` process on loopback, real clients.

The module's agent runs as the runtime install does: a ``sitecustomize`` on its PYTHONPATH blocks torch,
onnx, onnxscript, brevitas and matplotlib in the agent and in every measurement process it starts (the
``bench --device`` clients run the same way). Each fault must give a one-line error on the client
(exit 2), leave the agent's work folder empty and the agent serving.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_bench import W, _make_bundle, _model  # noqa: E402

from edgegate.benchmark import BenchConfig, bench, summarize_latencies  # noqa: E402
from edgegate.bundle import read_bundle, sha256_file  # noqa: E402
from edgegate.bundle_write import write_bundle  # noqa: E402
from edgegate.device import DeviceClient  # noqa: E402
from edgegate.device.transfer import pack_bundle  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TOKEN = "device-test-token-0123456789abcdef"
BLOCKER = """import sys
BLOCKED = {"torch", "onnx", "onnxscript", "brevitas", "matplotlib"}
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: runtime-only device")
sys.meta_path.insert(0, _Block())
"""


class AgentProcess:
    """``python -m edgegate.cli device serve --port 0 ...``; the URL is read from its first line of output."""

    def __init__(self, root: Path, *args: str, runtime_only: Path | None = None) -> None:
        self.workdir, self.log = root / "work", root / f"agent-{time.monotonic_ns()}.log"
        env = _env(runtime_only)
        cmd = [sys.executable, "-m", "edgegate.cli", "device", "serve", "--port", "0", "--token-file",
               str(root / "token"), "--workdir", str(self.workdir), "--name", "test-device", *args]
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True)
        line = self.proc.stdout.readline()  # the agent prints it once it listens
        match = re.search(r"serving (http://127\.0\.0\.1:\d+) ", line)
        assert match, (line, self.log.read_text())
        self.url = match.group(1)

    def stderr(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def _env(runtime_only: Path | None) -> dict[str, str]:
    paths = [str(runtime_only)] if runtime_only else []
    paths += [str(REPO), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "COLUMNS": "200"}


def _cli(*args: str, runtime_only: Path | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgegate.cli", *args], capture_output=True, text=True,
                          env=_env(runtime_only), cwd=cwd, timeout=180)


def _one_line_error(r: subprocess.CompletedProcess, *parts: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("edgegate: error: ") and r.stderr.count("\n") == 1, r.stderr
    for part in parts:
        assert part in r.stderr, r.stderr


def _raw(url: str, request: bytes, *, close_early: bool = False) -> bytes:
    """Send raw bytes to the agent; with `close_early` hang up at once, else half-close and read the answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as s:
        s.sendall(request)
        if close_early:
            return b""
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _answer(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _post(name: str, body: bytes, length: int | None = None, token: str = TOKEN) -> bytes:
    return (f"POST /v1/bench?bundle={name}&runs=5&warmup=1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n").encode() + body


def _empty_soon(workdir: Path, seconds: float = 10) -> list[str]:
    """The work folder's entries once it is empty (or after `seconds`): the agent cleans after answering."""
    deadline = time.monotonic() + seconds
    while (left := sorted(p.name for p in workdir.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _tar(bundle: Path) -> bytes:
    tar, _, _ = pack_bundle(bundle)
    with tar:
        return tar.read()


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("device")
    (root / "token").write_text(TOKEN + "\n")
    (root / "token").chmod(0o600)
    (root / "wrong").write_text("not-the-agents-token-000\n")
    (root / "wrong").chmod(0o600)
    (root / "blocker").mkdir()
    (root / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    return root


@pytest.fixture(scope="module")
def agent(root: Path):
    a = AgentProcess(root, "--max-upload-mb", "1", runtime_only=root / "blocker")
    yield a
    assert a.stop() == 0, a.stderr()
    assert "Traceback" not in a.stderr() and "internal error" not in a.stderr(), a.stderr()


@pytest.fixture(scope="module")
def bundles(root: Path) -> dict[str, Path]:
    """tiny (exits), big (a listed 1.5 MiB file), tampered (model.onnx edited), trt (a real TensorRT-RTX engine)."""
    tiny = _make_bundle(root / "tiny.edgegate", exits=True)
    big = root / "big.edgegate"
    shutil.copytree(tiny, big)
    (big / "pad.bin").write_bytes(np.random.default_rng(0).bytes(3 << 19))
    manifest = json.loads((big / "manifest.json").read_text())
    manifest["files"]["pad.bin"] = {"sha256": sha256_file(big / "pad.bin"), "bytes": 3 << 19}
    (big / "manifest.json").write_text(json.dumps(manifest))
    tampered = root / "tampered.edgegate"
    shutil.copytree(tiny, tampered)
    model = (tampered / "model.onnx").read_bytes()  # a weight swapped: still a valid ONNX file, not the exported one
    assert model.count(W.tobytes()) == 1
    (tampered / "model.onnx").write_bytes(model.replace(W.tobytes(), (W * 2).tobytes()))
    out = {"tiny": tiny, "big": big, "tampered": tampered}
    try:
        from edgegate import targets
        from edgegate.targets.trt import TrtOptions

        artifact = targets.get("trt").compile(_model(None), TrtOptions(flavor="rtx", opt_level=0), root)
        golden = read_bundle(tiny).file("golden_io.npz").read_bytes()
        out["trt"] = write_bundle(root / "trt.edgegate", {**artifact.files, "golden_io.npz": golden},
                                  {"target": "trt", "target_options": artifact.options})
    except Exception as e:  # no TensorRT package here: that test is skipped, the others run
        out["trt_why"] = str(e)
    return out


# ---------------------------------------------------------------------------------------- happy path


def test_info_says_what_the_device_runs(agent: AgentProcess, root: Path) -> None:
    r = _cli("device", "info", agent.url, "--token-file", str(root / "token"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"=== edgegate device agent: test-device ({agent.url}) ==="
    assert re.search(r"^Targets      : cpu yes \(onnxruntime \d", r.stdout, re.M)
    assert "Limits       : upload 1 MiB, 64 files" in r.stdout and "Queue        : 0 running, 0 waiting" in r.stdout
    info = DeviceClient(agent.url, TOKEN).info()  # what `device info --json` prints
    assert (info["format"], info["version"], info["name"]) == ("edgegate.device", 1, "test-device")
    assert info["limits"]["max_upload_bytes"] == 1 << 20 and info["host"]["cpu_count"] >= 1
    runs = {t["name"]: t["runs"] for t in info["targets"]}
    assert runs["cpu"] is True and set(runs) >= {"cpu", "snn", "trt"}


def test_bench_on_the_agent_matches_a_local_report_in_form(agent: AgentProcess, root: Path,
                                                           bundles: dict[str, Path]) -> None:
    tiny = str(bundles["tiny"])
    r = _cli("bench", tiny, "--device", agent.url, "--token-file", str(root / "token"), "--runs", "40", "--warmup",
             "2", "--json", str(root / "remote.json"), runtime_only=root / "blocker")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1] == f"Device       : test-device ({agent.url}), measured by its agent"
    remote = json.loads((root / "remote.json").read_text())
    here = bench(tiny, BenchConfig(runs=40, warmup=2)).to_dict()  # what `edgegate bench --json` writes

    def shape(d):  # keys all the way down, and the type of every leaf
        return {k: shape(v) for k, v in d.items()} if isinstance(d, dict) else type(d).__name__

    assert shape({**remote, "device": None}) == shape(here)
    assert (remote["format"], remote["version"]) == ("edgegate.bench", 5) and here["device"] is None
    assert remote["device"] == {"name": "test-device", "url": agent.url} and remote["bundle"] == tiny
    assert remote["runs"] == 40 and sum(remote["exits"]["counts"]) == 40  # batch 1: one exit per run
    assert remote["exits"]["counts"] == here["exits"]["counts"]  # same samples, same seed, same decisions
    assert remote["golden"] == here["golden"]
    assert remote["memory"]["peak_rss_before_mib"] < 200  # a fresh process measured it, not the agent's
    report = DeviceClient(agent.url, TOKEN).bench(tiny, BenchConfig(runs=25, warmup=0), latencies=True)
    assert len(report.latencies_ms) == 25 and summarize_latencies(report.latencies_ms) == report.latency
    assert _empty_soon(agent.workdir) == []


def test_compare_measures_latency_on_the_agent(agent: AgentProcess, root: Path, zoo_model) -> None:
    from edgegate import zoo
    from edgegate.loading import save
    from edgegate.pipeline import ExportConfig, run_export

    model, metrics = zoo_model("early_exit")
    save(model, root / "ee.pt", meta=zoo.checkpoint_meta("early_exit", metrics, 0))
    run_export(root / "ee.pt", root / "ee.edgegate", ExportConfig())
    r = _cli("compare", "ee.pt", "ee.edgegate", "--data", "clusters", "--max-samples", "200", "--runs", "20",
             "--warmup", "2", "--device", agent.url, "--token-file", "token", "--json", "cmp.json", cwd=root)
    assert r.returncode == 0, r.stderr
    assert f"ee.edgegate: latency measured on device test-device ({agent.url})" in r.stdout
    report = json.loads((root / "cmp.json").read_text())
    assert (report["format"], report["version"]) == ("edgegate.compare", 4)
    flt, ee = report["rows"]
    assert flt["device"] is None and ee["device"] == {"name": "test-device", "url": agent.url}
    assert ee["metrics"]["top1_agreement"] == 1.0 and ee["metrics"]["exit_agreement"] == 1.0  # fp32: measured here
    assert ee["latency"]["mean_ms"] > 0 and ee["batch"] == 1
    assert any("measured on that device by its agent" in n for n in report["notes"])
    assert _empty_soon(agent.workdir) == []


def test_two_clients_at_once_take_turns(agent: AgentProcess, root: Path, bundles: dict[str, Path]) -> None:
    """The first client holds its turn (headers sent, upload not yet), so the second is sure to queue behind it."""
    start, client = len(agent.stderr()), DeviceClient(agent.url, TOKEN)

    def queue_becomes(state: dict[str, int]) -> bool:
        deadline = time.monotonic() + 60
        while client.info()["queue"] != state and time.monotonic() < deadline:
            time.sleep(0.05)
        return client.info()["queue"] == state

    data = _tar(bundles["tiny"])
    parts = urlsplit(agent.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as first:
        first.sendall(_post("tiny.edgegate", data)[: -len(data)])  # the request, not its body yet
        assert queue_becomes({"running": 1, "waiting": 0})
        second = subprocess.Popen([sys.executable, "-m", "edgegate.cli", "bench", str(bundles["tiny"]), "--device",
                                   agent.url, "--token-file", str(root / "token"), "--runs", "30", "--json",
                                   str(root / "second.json")], env=_env(None), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        assert queue_becomes({"running": 1, "waiting": 1})  # the second waits
        first.sendall(data)
        first.shutdown(socket.SHUT_WR)
        answer = b"".join(iter(lambda: first.recv(65536), b""))
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    status, body = _answer(answer)
    assert status == 200 and body["report"]["runs"] == 5 and body["report"]["device"]["name"] == "test-device"
    report = json.loads((root / "second.json").read_text())
    assert report["runs"] == 30 and report["device"] == {"name": "test-device", "url": agent.url}
    log = agent.stderr()[start:]
    events = re.findall(r"job (\S+): (measuring|done)", log)
    assert [e for _, e in events] == ["measuring", "done", "measuring", "done"], log  # never two at once
    assert events[0][0] == events[1][0] and events[2][0] == events[3][0] != events[0][0]
    waits = [float(w) for w in re.findall(r"waited (\d+\.\d+) s", log)]
    assert len(waits) == 2 and waits[1] > 0, log
    assert _empty_soon(agent.workdir) == []


# -------------------------------------------------------------------------------------------- faults


def test_wrong_token_is_refused(agent: AgentProcess, root: Path, bundles: dict[str, Path]) -> None:
    r = _cli("bench", str(bundles["tiny"]), "--device", agent.url, "--token-file", str(root / "wrong"))
    _one_line_error(r, f"the device agent at {agent.url} refused: wrong token", "(HTTP 401)")
    status, body = _answer(_raw(agent.url, _post("tiny.edgegate", _tar(bundles["tiny"]), token="x" * 20)))
    assert status == 401 and body == {"error": "wrong token: use the token file the agent was started with"}
    status, body = _answer(_raw(agent.url, b"GET /v1/info HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status == 401 and body["error"].startswith("no token")
    assert _empty_soon(agent.workdir) == []


def test_oversized_upload_is_refused(agent: AgentProcess, root: Path, bundles: dict[str, Path]) -> None:
    r = _cli("bench", str(bundles["big"]), "--device", agent.url, "--token-file", str(root / "token"))
    _one_line_error(r, "as a tar; the agent test-device takes at most 1048576 (its --max-upload-mb)")
    data = _tar(bundles["big"])  # the agent checks too: a client that does not ask first
    status, body = _answer(_raw(agent.url, _post("big.edgegate", data[: 1 << 16], length=len(data))))
    assert status == 413, body
    assert body["error"] == (f"upload of {len(data)} bytes is over the agent's limit of 1048576 bytes "
                             "(--max-upload-mb)")
    assert _empty_soon(agent.workdir) == []


def test_truncated_upload_and_a_client_that_hangs_up(agent: AgentProcess, bundles: dict[str, Path]) -> None:
    data = _tar(bundles["tiny"])
    status, body = _answer(_raw(agent.url, _post("tiny.edgegate", data[:5000], length=len(data))))
    assert status == 400 and body["error"] == f"upload truncated: received 5000 of {len(data)} bytes (Content-Length)"
    assert _empty_soon(agent.workdir) == []
    before = len(agent.stderr())
    _raw(agent.url, _post("tiny.edgegate", data[:3000], length=len(data)), close_early=True)
    assert _empty_soon(agent.workdir) == []
    deadline = time.monotonic() + 10
    while "POST /v1/bench" not in agent.stderr()[before:] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert re.search(r"job \S+ from 127\.0\.0\.1: bundle tiny\.edgegate", agent.stderr()[before:])
    assert '"POST /v1/bench?bundle=tiny.edgegate&runs=5&warmup=1 HTTP/1.1" 400' in agent.stderr()[before:]
    status, body = _answer(_raw(agent.url, f"GET /v1/info HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()))
    assert status == 200 and body["queue"] == {"running": 0, "waiting": 0}  # still serving, nothing stuck


def test_tampered_bundle_is_refused_by_the_agent(agent: AgentProcess, root: Path, bundles: dict[str, Path]) -> None:
    r = _cli("bench", str(bundles["tampered"]), "--device", agent.url, "--token-file", str(root / "token"))
    _one_line_error(r, "refused: bundle tampered.edgegate: file model.onnx does not match its sha256 in manifest.json",
                    "(HTTP 422)")
    assert str(agent.workdir) not in r.stderr  # the agent's paths stay on the agent
    assert _empty_soon(agent.workdir) == []


def test_a_target_the_device_cannot_run(agent: AgentProcess, root: Path, bundles: dict[str, Path]) -> None:
    if "trt" not in bundles:
        pytest.skip(f"no TensorRT to build a trt bundle: {bundles['trt_why']}")
    info = DeviceClient(agent.url, TOKEN).info()
    trt = next(t for t in info["targets"] if t["name"] == "trt")
    if trt["runs"]:
        pytest.skip("this machine runs TensorRT engines")
    r = _cli("bench", str(bundles["trt"]), "--device", agent.url, "--token-file", str(root / "token"))
    _one_line_error(r, f"device test-device ({agent.url}) cannot run target trt of bundle {bundles['trt']}: ")
    status, body = _answer(_raw(agent.url, _post("trt.edgegate", _tar(bundles["trt"]))))  # the agent checks too
    assert status == 422 and body["error"].startswith("device test-device cannot run target trt: "), body
    assert _empty_soon(agent.workdir) == []


def test_agent_killed_or_stopped_mid_measurement(root: Path, bundles: dict[str, Path]) -> None:
    own = root / "killed"
    own.mkdir()
    (own / "token").write_bytes((root / "token").read_bytes())
    (own / "token").chmod(0o600)
    agent = AgentProcess(own)

    def long_bench(url: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "edgegate.cli", "bench", str(bundles["tiny"]), "--device", url,
                                 "--token-file", str(own / "token"), "--min-seconds", "60", "--max-seconds", "60"],
                                env=_env(None), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    client = long_bench(agent.url)
    try:
        deadline = time.monotonic() + 60
        while ": measuring" not in agent.stderr() and time.monotonic() < deadline:
            time.sleep(0.05)
        (job,) = list(agent.workdir.iterdir())
        time.sleep(0.5)  # the measurement process is running
        agent.proc.kill()
        agent.proc.wait(timeout=30)
        out, err = client.communicate(timeout=60)
    finally:
        for p in (client, agent.proc):
            if p.poll() is None:
                p.kill()
    assert client.returncode == 2, (out, err)
    assert err.startswith(f"edgegate: error: the device agent at {agent.url} closed the connection before "
                          "answering") and err.count("\n") == 1, err
    # The measurement process notices its agent is gone and ends; no orphan keeps timing.
    deadline = time.monotonic() + 20
    while _cwd_inside(job) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _cwd_inside(job) == []
    # A killed agent cannot clean up: the next start does, and serves.
    again = AgentProcess(own)
    try:
        assert list(again.workdir.iterdir()) == []
        assert "removed 1 job folder(s) an earlier agent left" in again.stderr()
        # Stopped (SIGTERM) mid-measurement, the agent ends the measurement and removes the job itself.
        client = long_bench(again.url)
        deadline = time.monotonic() + 60
        while ": measuring" not in again.stderr() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(again.workdir.iterdir()), "no job was running"
    finally:
        assert again.stop() == 0
        if client.poll() is None:
            client.communicate(timeout=60)
    out, err = client.communicate()
    assert client.returncode == 2 and err.count("\n") == 1, err
    assert err.startswith(f"edgegate: error: the device agent at {again.url} ") and "nothing was measured" in err
    assert list(again.workdir.iterdir()) == []
    assert "Traceback" not in again.stderr() and "ERROR" not in again.stderr(), again.stderr()


def _cwd_inside(folder: Path) -> list[int]:
    """Processes whose working directory is `folder` (the measurement process runs there); Linux /proc."""
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc/self/cwd").exists() else []:
        try:
            if entry.name.isdigit() and Path(os.readlink(entry / "cwd")).is_relative_to(folder):
                found.append(int(entry.name))
        except OSError:
            continue
    return found
