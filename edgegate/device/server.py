"""The agent's HTTP layer: the standard library's ``ThreadingHTTPServer``, hardened for untrusted peers.

Input: connections on the agent's address. Output: each request handed to the `Agent` (auth, routing,
work) and its answer sent as one JSON object; every error, including the server's own parse errors
(bad request line, headers too long, unknown method), as ``{"error": "<one line>"}``.

What this layer adds to ``http.server``: a bound on open connections (the next one is answered 503 at
once, no thread started); a time limit on every socket read of the request line and headers; a
request-body reader that stops at ``Content-Length``, enforces the upload's overall time limit and
tells a truncated upload from a slow one; a lingering close (an answer sent before the body was read
— a wrong token, a full queue — reaches a client that is still sending, instead of being lost to a
connection reset); no server banner with versions; access lines through ``logging``. Any exception that
escapes a handler is counted in ``Agent.internal_errors`` (the fuzz test asserts it stays 0).

Runtime side: standard library only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO, Protocol

from edgegate.device.protocol import JSON_TYPE
from edgegate.device.transfer import TransferError

log = logging.getLogger(__name__)

LINGER_BYTES = 1 << 20  # after an early answer, read (and drop) at most this much of the client's body
LINGER_SECONDS = 2.0
BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
        b'{"error": "the agent has too many open connections; retry later"}\n')


class Routes(Protocol):
    """What the server calls on the agent (``agent.Agent``): the HTTP layer knows nothing of bundles."""

    def dispatch(self, handler: Handler, method: str) -> None: ...

    def count_internal_error(self) -> None: ...


class Server(ThreadingHTTPServer):
    """One thread per connection, at most `max_connections` at a time."""

    daemon_threads = True
    request_queue_size = 32

    def __init__(self, address: tuple[str, int], agent: Routes, handler: type[Handler], max_connections: int) -> None:
        self.agent = agent
        self._slots = threading.BoundedSemaphore(max_connections)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.agent.count_internal_error()
        log.exception("unexpected error while serving %s", client_address)


class Handler(BaseHTTPRequestHandler):
    server: Server
    server_version = "edgegate-agent"
    sys_version = ""  # no Python version in the Server header
    protocol_version = "HTTP/1.0"  # one request per connection: nothing to resynchronise after an error
    timeout = 30.0  # every socket read of the request line and headers (StreamRequestHandler.setup)

    unread = 0  # bytes of the request body not read yet (for the lingering close)

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, TimeoutError) as e:  # the peer reset or stalled before its request was whole
            log.info("connection from %s dropped: %s", self.client_address[0], e)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.agent.dispatch(self, "GET")

    def do_POST(self) -> None:  # noqa: N802
        self.server.agent.dispatch(self, "POST")

    def send_json(self, status: int, obj: dict[str, Any]) -> None:
        body = (json.dumps(obj, allow_nan=False) + "\n").encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", JSON_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except OSError as e:  # the client left before its answer: nothing to tell it
            log.info("could not answer %s: %s", self.client_address[0], e)
        self.close_connection = True

    def send_file(self, status: int, body: BinaryIO) -> None:
        """Send the JSON in the open file `body` (a measurement's answer) without reading it into memory."""
        size = os.fstat(body.fileno()).st_size
        try:
            self.send_response(status)
            self.send_header("Content-Type", JSON_TYPE)
            self.send_header("Content-Length", str(size))
            self.send_header("Connection", "close")
            self.end_headers()
            shutil.copyfileobj(body, self.wfile, 1 << 20)
        except OSError as e:
            log.info("could not answer %s: %s", self.client_address[0], e)
        self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own refusals (bad request line, long headers, unknown method) in our JSON form.
        text = message or self.responses.get(code, ("error",))[0]
        self.send_json(code, {"error": " ".join(str(text).split())[:300]})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        log.info("%s %s", self.client_address[0], format % args)

    def finish(self) -> None:
        super().finish()
        if self.unread > 0:
            self._linger()

    def _linger(self) -> None:
        # Closing a socket with unread input makes the kernel reset the connection, and the client,
        # still sending, would lose our answer. So: no more output, drop a bounded amount of input.
        left, deadline = min(self.unread, LINGER_BYTES), time.monotonic() + LINGER_SECONDS
        try:
            self.connection.shutdown(socket.SHUT_WR)
            while left > 0 and time.monotonic() < deadline:
                self.connection.settimeout(max(deadline - time.monotonic(), 0.01))
                data = self.connection.recv(min(left, 1 << 16))
                if not data:
                    break
                left -= len(data)
        except OSError:
            pass


class Body:
    """The request body as a stream for tarfile: ends at Content-Length, within `seconds` overall."""

    def __init__(self, handler: Handler, length: int, seconds: float) -> None:
        self.handler, self.left, self.seconds = handler, length, seconds
        self.length = length
        self.deadline = time.monotonic() + seconds
        handler.unread = length

    def read(self, n: int = -1, /) -> bytes:
        if self.left == 0:
            return b""
        n = self.left if n is None or n < 0 else min(n, self.left)
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self._too_slow()
        self.handler.connection.settimeout(remaining)
        try:
            data = self.handler.rfile.read1(n)  # one socket read at most, so the deadline is checked often
        except TimeoutError:
            raise self._too_slow() from None
        except OSError as e:
            raise TransferError(f"the client dropped the connection during the upload ({e})") from e
        if not data:
            got = self.length - self.left
            raise TransferError(f"upload truncated: received {got} of {self.length} bytes (Content-Length)")
        self.left -= len(data)
        self.handler.unread = self.left
        return data

    def drain(self) -> None:
        """Read what follows the tar's end-of-archive (its padding): the whole body must arrive."""
        while self.read(1 << 16):
            pass
        self.handler.connection.settimeout(self.handler.timeout)  # the answer gets the usual time, not what is left

    def _too_slow(self) -> TransferError:
        got = self.length - self.left
        return TransferError(f"upload took longer than {self.seconds:g} s (the agent's limit; {got} of "
                             f"{self.length} bytes received); use a faster link or raise --upload-seconds", 408)
