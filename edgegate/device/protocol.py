"""Device agent protocol: what the agent and its client agree on (DESIGN.md §11).

Input: nothing (constants and small validators). Output: the HTTP paths, the auth header, the JSON
envelopes, the bench query string <-> `BenchConfig` mapping, the token file reader and `DeviceError`.

The protocol is plain HTTP/1.0 with JSON answers (served by the standard library's ``http.server``):

- ``GET /v1/info``: the agent's ``edgegate.device`` description (targets it can run, host, GPUs, limits,
  queue); the client reads it before uploading, so refusals it can predict cost no upload;
- ``POST /v1/bench?bundle=NAME&runs=..&warmup=..[&latencies=1]``: body = an uncompressed tar of the
  bundle's files (plain names, no folders), ``Content-Length`` required; answer ``{"report": <edgegate.bench
  report>, "latencies_ms": [...] (with ``latencies=1``, else []), "queued_s": s}``;
- every request carries ``Authorization: Bearer <token>``; every error is ``{"error": "<one line>"}``.

Runtime side: standard library + numpy only.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from edgegate.benchmark import MAX_RUNS, BenchConfig, BenchError
from edgegate.bundle import is_plain_name
from edgegate.errors import EdgegateError, os_error_text

INFO_PATH = "/v1/info"
BENCH_PATH = "/v1/bench"
INFO_FORMAT = "edgegate.device"
INFO_VERSION = 1
TAR_TYPE = "application/x-tar"
JSON_TYPE = "application/json"
AUTH_SCHEME = "Bearer "
TOKEN_MIN_CHARS = 16
TOKEN_MAX_BYTES = 4096
TOKEN_HINT = "umask 077; python -c 'import secrets; print(secrets.token_urlsafe(32))' > agent.token"
# BenchConfig fields a client may set: how each is parsed from the query string, and the largest value
# the agent takes (a batch is built in memory from the golden samples, so it is bounded like a file size).
# Runs are bounded like bench's time budget bounds them (MAX_RUNS), so every latency sent back with
# ``latencies=1`` is at most about 20 MB of JSON.
BENCH_FIELDS: dict[str, tuple[type, float]] = {
    "runs": (int, MAX_RUNS), "warmup": (int, MAX_RUNS), "threads": (int, 1024), "batch": (int, 1024),
    "seed": (int, 2**32 - 1), "max_seconds": (float, 86_400.0), "min_seconds": (float, 86_400.0),
    "min_runs": (int, MAX_RUNS),
}


class DeviceError(EdgegateError):
    """The agent refused a request, could not be reached, or answered something that is not edgegate's."""


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    """What a bench request asks for: the bundle's folder name, the bench settings, every run's latency?"""

    bundle: str
    config: BenchConfig
    latencies: bool = False  # send back every timed run's latency (compare plots their distribution)


def check_plain_name(name: object, what: str) -> str:
    """`name` if it is a plain file name (no folders, '..', drive, control characters), else DeviceError."""
    if not is_plain_name(name):
        shown = repr(name)[:80]
        raise DeviceError(f"{what} {shown} is not a plain file name (no folders, '..', '/' or control characters)")
    return name  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------- tokens


def read_token(path: str | os.PathLike[str]) -> str:
    """The shared secret in the file at `path`: one line of >= 16 visible ASCII characters, owner-only.

    A token readable by other users is refused (like ssh refuses a private key with loose rights).
    """
    p = Path(path)
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):
            raise DeviceError(f"token file {p} is not a regular file; write the token into a file: {TOKEN_HINT}")
        if os.name == "posix" and st.st_mode & 0o077:
            raise DeviceError(f"token file {p} can be read by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                              f"run: chmod 600 {p}")
        if st.st_size > TOKEN_MAX_BYTES:
            raise DeviceError(f"token file {p} is larger than {TOKEN_MAX_BYTES} bytes; it should hold one token")
        raw = p.read_bytes()
    except FileNotFoundError:
        raise DeviceError(f"token file {p} does not exist; create one: {TOKEN_HINT}") from None
    except OSError as e:
        raise DeviceError(f"token file {p} cannot be read: {os_error_text(e)}") from e
    token = raw.strip()
    if not all(33 <= b < 127 for b in token):
        raise DeviceError(f"token file {p} must hold one token of visible ASCII characters (no spaces)")
    if len(token) < TOKEN_MIN_CHARS:
        raise DeviceError(f"token in {p} is {len(token)} characters; use at least {TOKEN_MIN_CHARS}: {TOKEN_HINT}")
    return token.decode("ascii")


# ------------------------------------------------------------------------------------ bench queries


def bench_query(request: BenchRequest) -> str:
    """The query string of a bench request (only settings that are not None are sent)."""
    config = request.config
    params: dict[str, Any] = {"bundle": request.bundle}
    params.update({k: getattr(config, k) for k in BENCH_FIELDS if getattr(config, k) is not None})
    if request.latencies:
        params["latencies"] = 1
    return urlencode(params)


def parse_bench_query(params: Mapping[str, list[str]]) -> BenchRequest:
    """The `BenchRequest` of a parsed query (``parse_qs``); DeviceError names the bad field."""
    unknown = sorted(set(params) - set(BENCH_FIELDS) - {"bundle", "latencies"})
    if unknown:
        raise DeviceError(f"unknown bench parameter {unknown[0]!r}; known: bundle, latencies, "
                          f"{', '.join(BENCH_FIELDS)}")
    for key, values in params.items():
        if len(values) != 1:
            raise DeviceError(f"bench parameter {key!r} given {len(values)} times; give it once")
    name = check_plain_name(params.get("bundle", [""])[0], "bundle name")
    kw: dict[str, Any] = {}
    for key, (kind, most) in BENCH_FIELDS.items():
        if key not in params:
            continue
        text = params[key][0]
        try:
            value = kind(text)
        except ValueError:
            raise DeviceError(f"bench parameter {key}={text[:40]!r} is not a{'n int' if kind is int else ' number'}") \
                from None
        if not value <= most:  # `not <=`: NaN is refused too
            raise DeviceError(f"bench parameter {key}={text[:40]} is above the agent's limit of {most:g}")
        kw[key] = value
    latencies = params.get("latencies", ["0"])[0]
    if latencies not in ("0", "1"):
        raise DeviceError(f"bench parameter latencies={latencies[:20]!r} must be 0 or 1")
    try:
        config = BenchConfig(**kw)
    except BenchError as e:
        raise DeviceError(str(e)) from e
    return BenchRequest(name, config, latencies == "1")
