"""Fuzz the device agent: malformed HTTP requests over a real loopback socket to a real `Agent`.

The agent runs in this process (a ``ThreadingHTTPServer`` thread) so that an exception escaping a handler
is counted (``Agent.internal_errors``) instead of vanishing with the connection. Requests are built from
hostile parts (methods, paths, query strings, tokens, ``Content-Length`` values, chunked encoding, tar
bodies mutated from a real bundle's) or are byte-level mutations of a valid request. Whatever arrives,
the agent must answer with one JSON object (an ``error`` of one line unless the status is 200), count
no internal error, leave no job folder behind, and keep serving.

The seed bundle names a target no agent has (``fuzz-none``), so an upload that survives the mutations is
refused before a measurement process would start (the happy path is ``tests/e2e/test_device.py``'s).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from pathlib import Path

import pytest
from _fuzz import FUZZ, mutated
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_bench import _make_bundle  # noqa: E402

from edgegate.device import Agent, AgentConfig, TransferLimits  # noqa: E402
from edgegate.device.transfer import pack_bundle  # noqa: E402

TOKEN = "fuzz-token-0123456789abcdef"
KEYS = ("bundle", "runs", "warmup", "threads", "batch", "seed", "max_seconds", "x")
VALUES = ("tiny.edgegate", "2", "0", "-1", "1e9", "nan", "inf", "", "..", "a/b", "%00", "9" * 30, "1.5", "\u00e9")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fuzz_device")
    bundle = _make_bundle(root / "tiny.edgegate")
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "target": "fuzz-none"}))
    tar, _, _ = pack_bundle(bundle)
    with tar:
        seed = tar.read()
    config = AgentConfig(token=TOKEN, workdir=root / "work", port=0, name="fuzz", header_seconds=5,
                         limits=TransferLimits(max_bytes=1 << 20, max_files=8, seconds=5))
    agent = Agent(config)
    thread = threading.Thread(target=agent.serve_forever, daemon=True)
    thread.start()
    yield Served(agent, seed)
    agent.shutdown()
    thread.join(10)


def _exchange(agent: Agent, request: bytes) -> bytes:
    with socket.create_connection(agent._server.server_address[:2], timeout=30) as s:
        try:
            s.sendall(request)
            s.shutdown(socket.SHUT_WR)
        except OSError:  # the agent answered and closed before taking the whole request
            pass
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


class Served:
    """The running agent and the seed upload (no repr: hypothesis prints the failing request, not the seed)."""

    def __init__(self, agent: Agent, seed: bytes) -> None:
        self.agent, self.seed = agent, seed

    def __repr__(self) -> str:
        return f"<agent at {self.agent.url}>"


def _check(agent: Agent, request: bytes) -> None:
    errors = agent.internal_errors
    answer = _exchange(agent, request)
    assert agent.internal_errors == errors, "an exception escaped a handler (see the captured log)"
    assert not [p for p in agent.workdir.path.iterdir()], "a job folder was left behind"
    if not answer:  # http.server answers nothing to a connection whose first line is missing or blank
        assert not request.partition(b"\n")[0].strip() or b"\n" not in request, "a request line got no answer"
        return
    if answer.startswith(b"HTTP/"):
        head, sep, body = answer.partition(b"\r\n\r\n")
        assert sep, answer[:200]
        status = int(head.split(b" ", 2)[1])
        assert head.startswith(b"HTTP/1.0 ") and 200 <= status < 600
    else:  # an HTTP/0.9 request ("GET /path") gets a bare body, as http.server does
        status, body = None, answer
    obj = json.loads(body)
    assert isinstance(obj, dict)
    if status == 200 or status is None and "error" not in obj:
        assert obj.get("format") == "edgegate.device" or "report" in obj, obj
    else:
        assert isinstance(obj.get("error"), str) and obj["error"] and "\n" not in obj["error"], obj
        assert status is None or status in (400, 401, 404, 405, 408, 411, 413, 414, 422, 429, 431, 501, 503, 505)


PARTS = ("method", "path", "query", "version", "auth", "length", "headers")


@st.composite
def requests(draw: st.DrawFn, seed: bytes) -> bytes:
    """A valid bench upload with a few of its parts made hostile, and its tar body mutated half the time."""
    bad = draw(st.sets(st.sampled_from(PARTS), max_size=3))

    def pick(part: str, good: str, hostile: st.SearchStrategy) -> str | None:
        return draw(hostile) if part in bad else good

    body = draw(st.one_of(mutated([seed]), st.binary(max_size=1024), st.just(b""))) if draw(st.booleans()) else seed
    method = pick("method", "POST", st.sampled_from(["GET", "PUT", "DELETE", "HEAD", "OPTIONS", "post", "BREW", ""]))
    path = pick("path", "/v1/bench", st.one_of(
        st.sampled_from(["/v1/info", "/", "//v1/bench", "/v1/bench/", "*", "/v1/info/../bench", "v1/bench"]),
        st.text(alphabet="/abcv1.?%=&", max_size=40).map(lambda t: "/" + t),
    ))
    pairs = draw(st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(VALUES)), max_size=5))
    query = pick("query", "bundle=tiny.edgegate&runs=2&warmup=0", st.one_of(
        st.just("&".join(f"{k}={v}" for k, v in pairs)), st.sampled_from(["", "&&", "=", "a=1=2", "bundle"]),
        st.just("&".join(["bundle=tiny.edgegate", *(f"{k}={v}" for k, v in pairs[:2] if k != "bundle")])),
    ))
    version = pick("version", "HTTP/1.1", st.sampled_from(["HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "HTTX/1.1", ""]))
    auth = pick("auth", f"Bearer {TOKEN}", st.sampled_from(
        ["Bearer", "Bearer ", f"Bearer {TOKEN} ", TOKEN, "Basic Zm9v", f"bearer {TOKEN}", "Bearer \u00ff", None]))
    length = pick("length", str(len(body)), st.one_of(
        st.sampled_from([None, "-1", "abc", "1e3", " 12", "0x10", "9" * 25, str(2 << 20), "0", f"{len(body)}, 1"]),
        st.integers(0, 4096).map(str),
    ))
    headers = ["Host: x"] + ([f"Authorization: {auth}"] if auth is not None else [])
    headers += [f"Content-Length: {length}"] if length is not None else []
    if "headers" in bad:
        headers += draw(st.lists(st.sampled_from([
            "Transfer-Encoding: chunked", f"Content-Length: {len(body) + 1}", "X-Long: " + "a" * 70000,
            "Expect: 100-continue", "Connection: keep-alive", ": empty name", "no colon"]), min_size=1, max_size=3))
    line = " ".join(p for p in (method, f"{path}?{query}" if query else path, version) if p)
    head = (line + "\r\n" + "\r\n".join(headers) + "\r\n\r\n").encode("utf-8", "surrogatepass")
    return head + body


@FUZZ
@given(data=st.data())
def test_agent_answers_every_malformed_request(served, data: st.DataObject) -> None:
    agent, seed = served.agent, served.seed
    request = data.draw(requests(seed))
    _check(agent, request)


@FUZZ
@given(data=st.data())
def test_agent_survives_byte_mutations_of_a_request(served, data: st.DataObject) -> None:
    agent, seed = served.agent, served.seed
    valid = (f"POST /v1/bench?bundle=tiny.edgegate&runs=2&warmup=0 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
             f"{TOKEN}\r\nContent-Length: {len(seed)}\r\n\r\n").encode() + seed
    request = data.draw(mutated([valid, valid[:400], b"GET /v1/info HTTP/1.1\r\n\r\n"], max_mutations=6))
    _check(agent, request)


@pytest.mark.parametrize("length", [b"10\xb240", "\u0663\u0663".encode(), b"1_0", b"+10", b"10 "])
def test_found_by_fuzzing_content_length_in_other_digits(served, length: bytes) -> None:
    """A long run found b"10\\xb240" (read as "10²40"): str.isdigit() took it, int() did not."""
    agent, seed = served.agent, served.seed
    request = (f"POST /v1/bench?bundle=tiny.edgegate HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n".encode()
               + b"Content-Length: " + length + b"\r\n\r\n" + seed)
    _check(agent, request)


def test_agent_still_serves_after_the_fuzz(served) -> None:
    agent, seed = served.agent, served.seed
    answer = _exchange(agent, f"GET /v1/info HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.0 200 ") and json.loads(answer.partition(b"\r\n\r\n")[2])["name"] == "fuzz"
    request = (f"POST /v1/bench?bundle=tiny.edgegate HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n"
               f"Content-Length: {len(seed)}\r\n\r\n").encode() + seed
    answer = _exchange(agent, request)
    assert answer.startswith(b"HTTP/1.0 422 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"].startswith(
        "target 'fuzz-none' is not registered on device fuzz (it has cpu, snn, trt)")
    assert agent.internal_errors == 0
