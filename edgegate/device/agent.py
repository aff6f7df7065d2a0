"""The device agent: authenticated requests -> a description of the device, or a bundle's bench report.

Input: an `AgentConfig` (address, token, work folder, limits) and HTTP requests (``server.py``). Output:
for ``GET /v1/info`` the ``edgegate.device`` description (targets this device can run and why not,
host, GPUs, limits, queue); for ``POST /v1/bench`` the uploaded bundle's ``edgegate.bench`` report,
measured here, with ``device`` naming this agent.

A bench request, in order: the token (``hmac.compare_digest``), the query (`BenchConfig`, bounded),
``Content-Length`` against the upload limit, a place in the queue (bounded overall and per client; one
measurement at a time, so the body of a waiting client is read only at its turn), the tar streamed
into a fresh job folder (``transfer.extract_stream``: regular files with plain names, sizes and count
bounded, the upload's time limit), ``read_bundle`` (names, links, external data), the target registered
and runnable here, then a fresh measurement process (``worker.py``: ``edgegate.benchmark.bench``, which
verifies every sha256 before the golden check and the timed runs) under the agent's time limit. The job
folder is removed whatever happens. Nothing but a verified bundle on a registered target ever runs.

Runtime side: the standard library and numpy; the runtimes load only in the worker processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs

import edgegate
from edgegate.benchmark import BUDGET_MAX_SECONDS
from edgegate.bundle import read_bundle
from edgegate.device import server as http
from edgegate.device.jobs import MeasureQueue, QueueFull, Workdir
from edgegate.device.protocol import (
    AUTH_SCHEME,
    BENCH_PATH,
    INFO_FORMAT,
    INFO_PATH,
    INFO_VERSION,
    TOKEN_MIN_CHARS,
    DeviceError,
    parse_bench_query,
)
from edgegate.device.transfer import TransferError, TransferLimits, extract_stream
from edgegate.errors import EdgegateError, one_line, os_error_text

log = logging.getLogger(__name__)

UPLOAD_FOLDER = "upload"  # job/upload/<bundle name>; the worker's own files sit beside it in job/
_DIGITS = re.compile(r"[0-9]{1,20}")
CLOSE_SECONDS = 5.0  # at exit, how long open requests may take to answer (and remove their job folders)
WORKER_EXIT_REFUSED = 2  # worker.EXIT_REFUSED (not imported: worker.py is a program, imported by nothing)


class Refused(DeviceError):
    """A request the agent answers with an error ``status`` and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    token: str = dataclasses.field(repr=False)
    workdir: Path
    host: str = "127.0.0.1"  # loopback unless the user says otherwise (SECURITY.md, "Device agent")
    port: int = 8765  # 0: any free port (the agent's url says which)
    name: str = dataclasses.field(default_factory=socket.gethostname)
    limits: TransferLimits = TransferLimits()
    max_seconds: float = 300.0  # cap on a job's timed runs (its BenchConfig.max_seconds)
    job_seconds: float = 600.0  # the measurement process (load, golden check, warm-up, runs) is killed after this
    queue_total: int = 16  # jobs admitted at once, running + waiting
    queue_per_client: int = 4  # per client address (behind an SSH tunnel every client is 127.0.0.1)
    queue_seconds: float = 900.0  # longest wait for a turn
    max_connections: int = 32
    header_seconds: float = 30.0  # every socket read of a request line or header

    def __post_init__(self) -> None:
        for key in ("max_seconds", "job_seconds", "queue_seconds", "header_seconds"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise DeviceError(f"agent {key}={v!r} must be a positive number of seconds")
        for key in ("queue_total", "queue_per_client", "max_connections"):
            if not (isinstance(getattr(self, key), int) and getattr(self, key) >= 1):
                raise DeviceError(f"agent {key}={getattr(self, key)!r} must be an int >= 1")
        token = self.token.encode("latin-1", "replace") if isinstance(self.token, str) else b""
        if len(token) < TOKEN_MIN_CHARS or not all(33 <= c < 127 for c in token):
            raise DeviceError(f"agent token must be at least {TOKEN_MIN_CHARS} visible ASCII characters")
        if not (isinstance(self.port, int) and 0 <= self.port <= 65535):
            raise DeviceError(f"agent port {self.port!r} must be 0..65535")


class Agent(contextlib.AbstractContextManager):
    """Bind, clean the work folder, describe the device; `serve_forever` until `shutdown`."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._token = config.token.encode("latin-1")
        self.workdir = Workdir(config.workdir)
        self.workdir.lock()
        try:
            self._start()
        except BaseException:
            self.workdir.unlock()
            raise

    def _start(self) -> None:
        config = self.config
        removed = self.workdir.clean()
        if removed:
            log.warning("removed %d job folder(s) an earlier agent left in %s", len(removed), self.workdir.path)
        self.queue = MeasureQueue(config.queue_total, config.queue_per_client, config.queue_seconds)
        self._lock = threading.Condition()  # guards the workers, the closing flag and the requests in flight
        self._in_flight = 0
        self._workers: set[subprocess.Popen] = set()
        self._closing = False
        self.internal_errors = 0
        self._static: dict[str, Any] = {}
        self._runnable = self._describe()
        handler = type("Handler", (http.Handler,), {"timeout": config.header_seconds})
        try:
            self._server = http.Server((config.host, config.port), self, handler, config.max_connections)
        except OSError as e:
            raise DeviceError(f"cannot listen on {config.host}:{config.port}: {os_error_text(e)}; "
                              "choose another --host/--port") from e

    # ---------------------------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"

    def serve_forever(self) -> None:
        self._server.serve_forever(poll_interval=0.2)

    def shutdown(self) -> None:
        """Stop serving (from another thread), end running measurements, close the socket."""
        self._server.shutdown()
        self.close()

    def close(self) -> None:
        """End running measurements and let their requests remove their job folders (a few seconds at most)."""
        self.queue.close(0)
        with self._lock:
            self._closing = True
            workers = list(self._workers)
        for proc in workers:
            proc.kill()
        # The requests then answer (a job's folder is removed before its answer is sent).
        with self._lock:
            if not self._lock.wait_for(lambda: self._in_flight == 0, timeout=CLOSE_SECONDS):
                log.warning("a request was still open at exit; the next start of the agent removes its job folder")
        self._server.server_close()
        self.workdir.unlock()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def count_internal_error(self) -> None:
        with self._lock:
            self.internal_errors += 1

    # ----------------------------------------------------------------------------------- requests

    def dispatch(self, handler: http.Handler, method: str) -> None:
        """Authenticate, route, answer: every outcome is one JSON object."""
        with self._lock:
            self._in_flight += 1
        try:
            self._dispatch(handler, method)
        finally:
            with self._lock:
                self._in_flight -= 1
                self._lock.notify_all()

    def _dispatch(self, handler: http.Handler, method: str) -> None:
        try:
            handler.unread = _declared_length(handler)
            self._authorize(handler.headers.get("Authorization"))
            path, _, query = handler.path.partition("?")
            if path == INFO_PATH and method == "GET":
                handler.send_json(200, self.info())
            elif path == BENCH_PATH and method == "POST":
                with self._bench(handler, query) as answer:
                    handler.send_file(200, answer)
            elif path in (INFO_PATH, BENCH_PATH):
                raise Refused(405, f"{path} does not take {method}")
            else:
                raise Refused(404, f"no such endpoint {path[:80]!r}; the agent serves {INFO_PATH} and {BENCH_PATH}")
        except (Refused, TransferError, QueueFull) as e:
            handler.send_json(e.status, {"error": one_line(e, 1000)})
        except EdgegateError as e:  # a bundle that fails verification, a target that is not registered
            handler.send_json(422, {"error": one_line(e, 1000)})
        except Exception:
            self.count_internal_error()
            log.exception("internal error while answering %s %s", method, handler.path[:200])
            handler.send_json(500, {"error": "internal error in the agent; its log has the details"})

    def _authorize(self, header: str | None) -> None:
        if not header or not header.startswith(AUTH_SCHEME):
            raise Refused(401, "no token: send the agent's token (`--token-file`) as `Authorization: Bearer ...`")
        given = header[len(AUTH_SCHEME):].encode("latin-1", "replace")
        if not hmac.compare_digest(given, self._token):  # constant time: no guessing byte by byte
            raise Refused(401, "wrong token: use the token file the agent was started with")

    def info(self) -> dict[str, Any]:
        return {**self._static, "queue": self.queue.state()}

    def _bench(self, handler: http.Handler, query: str) -> BinaryIO:
        """The measurement's answer, an open file (its job folder already removed): the report is streamed
        to the client, never held in the agent's memory (a child's peak RSS starts from the agent's)."""
        try:
            params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=16)
            request = parse_bench_query(params)
        except ValueError as e:
            raise Refused(400, f"malformed query string ({one_line(e, 80)})") from e
        except DeviceError as e:
            raise Refused(400, str(e)) from None
        # The agent's cap on timed runs; under a time budget its own cap (BUDGET_MAX_SECONDS) stays the default.
        asked, cap = request.config.max_seconds, self.config.max_seconds
        default = BUDGET_MAX_SECONDS if request.config.runs is None else cap
        config = dataclasses.replace(request.config, max_seconds=min(default if asked is None else asked, cap))
        name, length, client = request.bundle, _content_length(handler, self.config.limits), handler.client_address[0]
        with self.queue.turn(client) as waited, self.workdir.job() as job:
            log.info("job %s from %s: bundle %s, %d bytes, waited %.2f s", job.name, client, name, length, waited)
            body = http.Body(handler, length, self.config.limits.seconds)
            upload = job / UPLOAD_FOLDER
            upload.mkdir()
            extract_stream(body, upload / name, self.config.limits)
            body.drain()
            try:
                self._precheck(upload / name)
                log.info("job %s: measuring", job.name)
                # The worker writes the whole answer; the device field's URL is the client's to fill in.
                meta = {"config": dataclasses.asdict(config), "latencies": request.latencies, "bundle": name,
                        "device": {"name": self.config.name, "url": None}, "queued_s": round(waited, 3)}
                code, out = self._run_worker(job, ["bench", str(upload / name), json.dumps(meta)])
                if code != 0 and self._closing:
                    raise Refused(503, "the agent was stopped during the measurement; nothing was measured")
                if code != 0:
                    raise Refused(500, f"the measurement process failed (exit code {code}); the agent's log has "
                                       "its errors")
                return open(out, "rb")  # noqa: SIM115 (stays readable once the job folder is gone; caller closes)
            except EdgegateError as e:
                # Paths inside the job folder mean nothing to the client: name the bundle as it sent it.
                raise Refused(getattr(e, "status", 422), str(e).replace(f"{upload}{os.sep}", "")) from None
            finally:
                log.info("job %s: done", job.name)

    def _precheck(self, path: Path) -> None:
        bundle = read_bundle(path, verify=False)  # names, links, external data; the worker checks sha256
        if bundle.target not in self._runnable:
            raise Refused(422, f"target {bundle.target!r} is not registered on device {self.config.name} (it has "
                               f"{', '.join(self._runnable)}); install the target's package there")
        ok, why = self._runnable[bundle.target]
        if not ok:
            raise Refused(422, f"device {self.config.name} cannot run target {bundle.target}: {why}")

    def _run_worker(self, job: Path, args: list[str]) -> tuple[int, Path]:
        """Run ``worker.py`` with `args` in `job`: (exit code, its output file). A refusal raises `Refused`."""
        out, err = job / "worker.out", job / "worker.err"
        (job / "tmp").mkdir()
        env = {**os.environ, "TMPDIR": str(job / "tmp"), "ORT_DISABLE_TELEMETRY": "1"}
        with open(out, "wb") as fo, open(err, "wb") as fe, self._lock:
            if self._closing:  # stopped after the job was taken for measuring, before its process started
                raise Refused(503, "the agent was stopped during the measurement; nothing was measured")
            # stdin stays open while the worker runs: it exits when the agent (and so the pipe) is gone.
            proc = subprocess.Popen([sys.executable, "-m", "edgegate.device.worker", *args], stdin=subprocess.PIPE,
                                    stdout=fo, stderr=fe, cwd=job, env=env)
            self._workers.add(proc)
        try:
            code = proc.wait(timeout=self.config.job_seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise Refused(504, f"the measurement took longer than {self.config.job_seconds:g} s (the agent's "
                               "--job-seconds); ask for fewer --runs or a smaller --max-seconds") from None
        finally:
            with self._lock:
                self._workers.discard(proc)
            assert proc.stdin is not None
            proc.stdin.close()
        if code == WORKER_EXIT_REFUSED:
            answer = _small_json(out)
            if isinstance(answer.get("error"), str):
                raise Refused(422, answer["error"])
        if code != 0 and not self._closing:
            log.error("worker %s exited with %s: %s", args[0], code, err.read_bytes()[-4000:].decode(errors="replace"))
        return code, out

    def _describe(self) -> dict[str, tuple[bool, str]]:
        """Probe the targets in a worker (the agent never loads a runtime); {target: (runs, why)}."""
        with self.workdir.job() as job:
            code, out = self._run_worker(job, ["describe"])
            answer = _small_json(out) if code == 0 else {}
        if not isinstance(answer.get("targets"), list):
            raise DeviceError(f"the agent could not probe this device's targets (worker exit code {code}); "
                              "run `edgegate targets` here to see why")
        limits = self.config.limits
        self._static = {
            "format": INFO_FORMAT,
            "version": INFO_VERSION,
            "name": self.config.name,
            "edgegate": edgegate.__version__,
            "targets": answer["targets"],
            "host": answer.get("host"),
            "gpus": answer.get("gpus"),
            "limits": {"max_upload_bytes": limits.max_bytes, "max_files": limits.max_files,
                       "upload_seconds": limits.seconds, "max_seconds": self.config.max_seconds,
                       "job_seconds": self.config.job_seconds, "queue_total": self.config.queue_total,
                       "queue_per_client": self.config.queue_per_client, "queue_seconds": self.config.queue_seconds},
        }
        return {t["name"]: (t["runs"] is True, str(t["detail"])) for t in answer["targets"]}


def _small_json(path: Path) -> dict[str, Any]:
    """The worker's one-line JSON answer in `path` (a refusal or the device probe: small), or {}."""
    try:
        answer = json.loads(path.read_bytes()[-(1 << 20):].decode().strip().splitlines()[-1])
    except (ValueError, IndexError, UnicodeDecodeError, OSError):
        return {}
    return answer if isinstance(answer, dict) else {}


def _declared_length(handler: http.Handler) -> int:
    text = handler.headers.get("Content-Length")
    try:
        return max(int(text), 0) if text is not None else 0
    except ValueError:
        return http.LINGER_BYTES


def _content_length(handler: http.Handler, limits: TransferLimits) -> int:
    if handler.headers.get("Transfer-Encoding") is not None:
        raise Refused(411, "send the bundle with a Content-Length, not a Transfer-Encoding")
    values = handler.headers.get_all("Content-Length") or []
    if not values:
        raise Refused(411, "a bench request needs a Content-Length (the tar's size)")
    text = values[0].strip()
    if len(values) > 1 or not _DIGITS.fullmatch(text):  # ASCII digits: str.isdigit() also takes "²"
        raise Refused(400, f"Content-Length {', '.join(values)[:60]!r} is not one byte count")
    length = int(text)
    if length > limits.max_bytes:
        raise Refused(413, f"upload of {length} bytes is over the agent's limit of {limits.max_bytes} bytes "
                           "(--max-upload-mb)")
    return length
