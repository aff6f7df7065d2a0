"""edgegate.device parts without a server: tar transfer, queue, work folder, tokens, query, report round trip.

The agent and client over real sockets and processes are in ``tests/e2e/test_device.py``.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_bench import _make_bundle

from edgegate.benchmark import BenchConfig, BenchError, bench
from edgegate.device.client import DeviceClient
from edgegate.device.jobs import JOB_PREFIX, MARKER, MeasureQueue, QueueFull, Workdir
from edgegate.device.protocol import BenchRequest, DeviceError, bench_query, parse_bench_query, read_token
from edgegate.device.report import read_bench_report
from edgegate.device.transfer import TransferError, TransferLimits, extract_stream, pack_bundle

LIMITS = TransferLimits(max_bytes=1 << 16, max_files=4, seconds=10)


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


# ------------------------------------------------------------------------------------------- transfer


def test_pack_then_extract_gives_back_the_listed_files(tmp_path: Path) -> None:
    bundle = _make_bundle(tmp_path / "tiny.edgegate", exits=True)
    (bundle / "notes.txt").write_text("not listed in the manifest: not sent")
    tar, size, name = pack_bundle(bundle)
    with tar:
        data = tar.read()
    assert name == "tiny.edgegate" and size == len(data) and size % 512 == 0
    names = extract_stream(io.BytesIO(data), tmp_path / "out", TransferLimits())
    assert sorted(names) == ["golden_io.npz", "manifest.json", "model.onnx"]
    for n in names:
        assert (tmp_path / "out" / n).read_bytes() == (bundle / n).read_bytes()
    assert bench(tmp_path / "out", BenchConfig(runs=5, warmup=0)).golden.samples == 8  # a bundle again


@pytest.mark.parametrize(("members", "message", "status"), [
    ([(_member("../evil"), b"x")], "tar member '../evil' is not a plain file name", 400),
    ([(_member("/etc/passwd"), b"x")], "is not a plain file name", 400),
    ([(_member("a/b"), b"x")], "tar member 'a/b' is not a plain file name", 400),
    ([(_member("ln", tarfile.SYMTYPE, "/etc/passwd"), b"")], "tar member 'ln' is a link", 400),
    ([(_member("hard", tarfile.LNKTYPE, "x"), b"")], "tar member 'hard' is a link", 400),
    ([(_member("dir", tarfile.DIRTYPE), b"")], "tar member 'dir' is a folder", 400),
    ([(_member("null", tarfile.CHRTYPE), b"")], "tar member 'null' is a special file", 400),
    ([(_member("fifo", tarfile.FIFOTYPE), b"")], "tar member 'fifo' is a special file", 400),
    ([(_member("m"), b"1"), (_member("m"), b"2")], "tar member 'm' appears twice", 400),
    ([(_member(f"f{i}"), b"x") for i in range(5)], "upload holds more than 4 files", 413),
    ([(_member("big"), b"x" * (1 << 16)), (_member("more"), b"y")], "more than 65536 bytes of files", 413),
    ([], "upload holds no files", 400),
])
def test_extract_refuses_what_is_not_a_plain_bundle(tmp_path: Path, members, message: str, status: int) -> None:
    with pytest.raises(TransferError, match=message.replace("(", r"\(")) as e:
        extract_stream(io.BytesIO(_tar(*members)), tmp_path / "out", LIMITS)
    assert e.value.status == status
    assert not (tmp_path / "evil").exists() and not (tmp_path / "ln").exists()  # nothing outside `out`
    assert [p for p in (tmp_path / "out").iterdir() if p.is_symlink() or not p.is_file()] == []


def test_extract_refuses_garbage_and_truncation(tmp_path: Path) -> None:
    data = _tar((_member("model.onnx"), b"z" * 3000))
    with pytest.raises(TransferError, match="not a valid uncompressed tar"):
        extract_stream(io.BytesIO(b"\x1f\x8b" + b"\0" * 1022), tmp_path / "a", LIMITS)  # gzip: compression refused
    with pytest.raises(TransferError, match="truncated|not a valid uncompressed tar"):
        extract_stream(io.BytesIO(data[:1500]), tmp_path / "b", LIMITS)
    assert os.listdir(tmp_path / "b") in ([], ["model.onnx"])  # the partial file is the caller's to remove


# ---------------------------------------------------------------------------------------------- queue


def test_queue_is_fifo_one_at_a_time_and_bounded() -> None:
    q = MeasureQueue(total=3, per_client=2, max_wait_s=10)
    order: list[str] = []
    running = threading.Semaphore(0)

    def job(client: str, tag: str) -> None:
        with q.turn(client):
            order.append(f"start {tag}")
            time.sleep(0.05)
            order.append(f"end {tag}")
        running.release()

    with q.turn("a") as waited:
        assert waited < 0.5 and q.state() == {"running": 1, "waiting": 0}
        threads = [threading.Thread(target=job, args=(c, t)) for c, t in (("a", "a2"), ("b", "b1"))]
        for t in threads:
            t.start()
            time.sleep(0.1)  # arrival order: a2, then b1
        assert q.state() == {"running": 1, "waiting": 2}
        with pytest.raises(QueueFull, match="queue is full") as e:  # 3 admitted: total reached
            with q.turn("c"):
                pass
        assert e.value.status == 503
    for t in threads:
        t.join(5)
    assert order == ["start a2", "end a2", "start b1", "end b1"]  # never two at once, first come first served
    assert q.state() == {"running": 0, "waiting": 0}


def test_queue_bound_per_client_and_wait_limit() -> None:
    q = MeasureQueue(total=8, per_client=1, max_wait_s=0.2)
    with q.turn("a"):
        with pytest.raises(QueueFull, match="already has 1 jobs queued") as e:
            with q.turn("a"):
                pass
        assert e.value.status == 429
        t0 = time.monotonic()
        with pytest.raises(QueueFull, match="waited 0.2 s"):
            with q.turn("b"):
                pass
        assert 0.15 < time.monotonic() - t0 < 5
    with q.turn("b") as waited:  # the one that gave up left no trace
        assert waited < 0.5


def test_queue_close_sends_the_waiting_away_and_waits_for_the_running_job() -> None:
    q = MeasureQueue(total=4, per_client=4, max_wait_s=10)
    errors: list[str] = []

    def wait_in_line() -> None:
        try:
            with q.turn("b"):
                errors.append("got a turn")
        except QueueFull as e:
            errors.append(f"{e.status} {e}")

    with q.turn("a"):
        waiter = threading.Thread(target=wait_in_line)
        waiter.start()
        time.sleep(0.1)
        assert q.close(0) is False  # a job is running
        waiter.join(5)
        assert errors == ["503 the agent is stopping; retry when it is back"]
        with pytest.raises(QueueFull, match="the agent is stopping"):
            with q.turn("c"):
                pass
    assert q.close(1) is True and q.state() == {"running": 0, "waiting": 0}


# -------------------------------------------------------------------------------------------- workdir


def test_workdir_cleans_only_its_own_job_folders(tmp_path: Path) -> None:
    root = tmp_path / "agent"
    w = Workdir(root)
    with w.job() as job:
        assert job.name.startswith(JOB_PREFIX) and (job / MARKER).is_file()
        (job / "upload").mkdir()
    assert list(root.iterdir()) == []  # removed after the request
    left = root / f"{JOB_PREFIX}left"
    left.mkdir()
    (left / MARKER).write_text("")
    (left / "model.onnx").write_text("x")
    mine = root / f"{JOB_PREFIX}users"  # the user's own folder with our prefix but no marker
    mine.mkdir()
    (root / "notes.txt").write_text("keep")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / MARKER).write_text("")
    (root / f"{JOB_PREFIX}link").symlink_to(outside)
    assert w.clean() == [left.name]
    assert sorted(p.name for p in root.iterdir()) == [f"{JOB_PREFIX}link", f"{JOB_PREFIX}users", "notes.txt"]
    assert (outside / MARKER).exists()


def test_workdir_must_be_private_and_used_by_one_agent(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(DeviceError, match="writable by other users"):
        Workdir(shared)
    a, b = Workdir(tmp_path / "w"), Workdir(tmp_path / "w")
    a.lock()
    with pytest.raises(DeviceError, match="in use by another device agent"):
        b.lock()
    a.unlock()
    b.lock()
    b.unlock()


# --------------------------------------------------------------------------------------------- tokens


def test_read_token(tmp_path: Path) -> None:
    f = tmp_path / "t"
    with pytest.raises(DeviceError, match="does not exist; create one"):
        read_token(f)
    f.write_text("s3cret-token-0123456789\n")
    f.chmod(0o644)
    with pytest.raises(DeviceError, match=f"can be read by other users .*chmod 600 {f}"):
        read_token(f)
    f.chmod(0o600)
    assert read_token(f) == "s3cret-token-0123456789"
    f.write_text("short\n")
    with pytest.raises(DeviceError, match="is 5 characters; use at least 16"):
        read_token(f)
    f.write_text("two words in one token file\n")
    with pytest.raises(DeviceError, match="visible ASCII"):
        read_token(f)


# ---------------------------------------------------------------------------------------------- query


def test_bench_query_round_trip_and_refusals() -> None:
    from urllib.parse import parse_qs

    request = BenchRequest("m.edgegate", BenchConfig(runs=7, warmup=1, threads=2, max_seconds=1.5), latencies=True)
    assert parse_bench_query(parse_qs(bench_query(request))) == request
    budget = BenchRequest("m.edgegate", BenchConfig(min_seconds=0.25, min_runs=10))  # runs=None: a time budget
    assert parse_bench_query(parse_qs(bench_query(budget))) == budget
    for query, message in [
        ("bundle=m&runs=x", "runs='x' is not an int"),
        ("bundle=m&runs=1&runs=2", "'runs' given 2 times"),
        ("bundle=m&rm=1", "unknown bench parameter 'rm'"),
        ("bundle=..", "bundle name '..' is not a plain file name"),
        ("bundle=a%2Fb", "bundle name 'a/b' is not a plain file name"),
        ("bundle=m&batch=100000", "batch=100000 is above the agent's limit of 1024"),
        ("bundle=m&max_seconds=nan", "max_seconds=nan is above the agent's limit"),
        ("bundle=m&max_seconds=inf", "max_seconds=inf is above the agent's limit"),
        ("bundle=m&runs=0", "bench runs=0 must be an int >= 1"),
        ("bundle=m&latencies=yes", "latencies='yes' must be 0 or 1"),
        ("bundle=m&runs=2000000", "runs=2000000 is above the agent's limit of 1e\\+06"),
        ("bundle=m&min_seconds=0", "bench min_seconds=0.0 must be a finite number of seconds > 0"),
    ]:
        with pytest.raises(DeviceError, match=message):
            parse_bench_query(parse_qs(query))


# --------------------------------------------------------------------------------------------- report


def test_bench_report_round_trips_through_json(tmp_path: Path) -> None:
    report = bench(_make_bundle(tmp_path / "b", exits=True), BenchConfig(runs=10, warmup=1), keep_latencies=True)
    report = report.__class__(**{**report.__dict__, "device": {"name": "pi", "url": "http://127.0.0.1:1"}})
    d = json.loads(json.dumps(report.to_dict()))
    back = read_bench_report(d, report.latencies_ms)
    assert back == report and back.to_dict() == d and back.latencies_ms == report.latencies_ms
    with pytest.raises(BenchError, match="report version 2 is not the one this edgegate reads"):
        read_bench_report({**d, "version": 2})
    with pytest.raises(BenchError, match="malformed edgegate.bench report .*mean_ms is str"):
        read_bench_report({**d, "latency": {**d["latency"], "mean_ms": "fast"}})
    with pytest.raises(BenchError, match="malformed edgegate.bench report .*KeyError"):
        read_bench_report({k: v for k, v in d.items() if k != "golden"})
    with pytest.raises(BenchError, match="not an edgegate.bench report"):
        read_bench_report([1, 2])


# --------------------------------------------------------------------------------------------- client


class _Hostile(BaseHTTPRequestHandler):
    """Answers every GET with the server's `answer` (status, body): an agent that lies or breaks."""

    def do_GET(self) -> None:  # noqa: N802
        status, body = self.server.answer  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def hostile():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


GOOD_INFO = {"format": "edgegate.device", "version": 1, "name": "pi", "targets": [], "limits": {}, "queue": {},
             "host": None, "gpus": None}


@pytest.mark.parametrize(("status", "body", "message"), [
    (200, b"<html>hello</html>", "sent an answer that is not JSON; check the URL"),
    (200, b'{"format": "other"}', "did not answer as an edgegate device agent"),
    (200, json.dumps({**GOOD_INFO, "version": 99}).encode(), "speaks edgegate.device version 99, this edgegate "
                                                              "version 1"),
    (200, json.dumps({**GOOD_INFO, "limits": {"max_upload_bytes": "big"}}).encode(), "malformed edgegate.device"),
    (200, json.dumps({**GOOD_INFO, "targets": "cpu"}).encode(), "malformed edgegate.device"),
    (500, b"<html>oops</html>", "refused: HTTP 500 Internal Server Error"),
    (401, b'{"error": "wrong token: use the token file the agent was started with"}',
     "refused: wrong token: use the token file the agent was started with (HTTP 401)"),
])
def test_client_turns_a_hostile_or_broken_agent_into_one_line(hostile, status: int, body: bytes, message: str) -> None:
    hostile.answer = (status, body)
    url = f"http://127.0.0.1:{hostile.server_address[1]}"
    with pytest.raises(DeviceError, match=re.escape(message)) as e:
        DeviceClient(url, "t" * 20).info()
    assert "\n" not in str(e.value)
    hostile.answer = (200, json.dumps(GOOD_INFO).encode())
    assert DeviceClient(url, "t" * 20).info()["name"] == "pi"


def test_client_refuses_bad_urls_and_says_when_nothing_listens() -> None:
    for url in ("ftp://h:1", "http://", "http://u:p@h:1", "http://h:1/api", "http://h:1?x=1"):
        with pytest.raises(DeviceError, match="must be"):
            DeviceClient(url, "t" * 20)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    where = rf"cannot reach the device agent at http://127\.0\.0\.1:{port}: "
    with pytest.raises(DeviceError, match=where + ".*is `edgegate device serve` running there"):
        DeviceClient(f"http://127.0.0.1:{port}", "t" * 20).info()
