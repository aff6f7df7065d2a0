"""The device agent's client: a bundle directory -> its ``edgegate.bench`` report, measured on the device.

Input: the agent's URL (``http://`` or ``https://``, e.g. a TLS proxy or an SSH tunnel in front of the
agent), its token and a bundle directory with a `BenchConfig`. Output: `DeviceClient.info` (the agent's
``edgegate.device`` description) and `DeviceClient.bench` (a `BenchReport` whose ``device`` names the
agent and whose ``bundle`` is the local path). Before uploading, the client asks the agent what it can
run and how large an upload it takes, so those refusals cost no upload; the agent checks them again.

Every failure (agent unreachable, wrong token, refusal, connection dropped mid-measurement, an answer
that is not edgegate's) is a `DeviceError` with one line saying what happened and what to do.

Runtime side: the standard library's ``urllib`` + numpy; no torch or onnx.
"""

from __future__ import annotations

import dataclasses
import json
import os
from http.client import HTTPException
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

from edgegate.benchmark import BenchConfig, BenchError, BenchReport
from edgegate.bundle import read_bundle
from edgegate.device.protocol import (
    AUTH_SCHEME,
    BENCH_PATH,
    INFO_FORMAT,
    INFO_PATH,
    INFO_VERSION,
    JSON_TYPE,
    TAR_TYPE,
    BenchRequest,
    DeviceError,
    bench_query,
)
from edgegate.device.report import read_bench_report
from edgegate.device.transfer import pack_bundle
from edgegate.errors import TargetError, one_line

INFO_TIMEOUT_S = 30.0
BENCH_TIMEOUT_S = 3600.0  # queue wait + upload + measurement; the agent bounds each of them itself
MAX_ANSWER_BYTES = 64 << 20  # a report with every latency of protocol.MAX_LATENCIES runs is about 20 MB


class DeviceTargetError(DeviceError, TargetError):
    """The agent cannot run the bundle's target (compare shows such a bundle as skipped)."""


@dataclasses.dataclass(frozen=True)
class DeviceClient:
    url: str
    token: str = dataclasses.field(repr=False)
    timeout_s: float = BENCH_TIMEOUT_S

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DeviceError(f"device URL {self.url[:80]!r} must be http://HOST:PORT or https://HOST:PORT")
        if parts.username or parts.password or parts.query or parts.fragment or parts.path not in ("", "/"):
            raise DeviceError(f"device URL {self.url[:80]!r} must be only scheme, host and port "
                              "(the token goes in --token-file)")
        object.__setattr__(self, "url", f"{parts.scheme}://{parts.netloc}")

    # -------------------------------------------------------------------------------------- calls

    def info(self) -> dict[str, Any]:
        """The agent's description of itself (``edgegate.device``): targets, host, GPUs, limits, queue."""
        answer = self._call(Request(self.url + INFO_PATH, headers=self._headers()), INFO_TIMEOUT_S)
        if not isinstance(answer, dict) or answer.get("format") != INFO_FORMAT:
            raise DeviceError(f"{self.url} did not answer as an edgegate device agent; check the URL")
        if answer.get("version") != INFO_VERSION:
            raise DeviceError(f"the agent at {self.url} speaks {INFO_FORMAT} version {str(answer.get('version'))[:20]}"
                              f", this edgegate version {INFO_VERSION}; install the same edgegate on both sides")
        targets, limits, queue = answer.get("targets"), answer.get("limits"), answer.get("queue")
        well_formed = (
            isinstance(answer.get("name"), str)
            and isinstance(targets, list)
            and all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in targets)
            and isinstance(limits, dict)
            and all(_is_number(v) for v in limits.values())
            and isinstance(queue, dict)
            and all(_is_number(v) for v in queue.values())
            and all(isinstance(answer.get(k), (dict, type(None))) for k in ("host", "gpus"))
        )
        if not well_formed:
            raise DeviceError(f"the agent at {self.url} sent a malformed {INFO_FORMAT} description; check the URL")
        return answer

    def bench(self, bundle_path: str | os.PathLike[str], config: BenchConfig | None = None, *,
              latencies: bool = False) -> BenchReport:
        """Upload the bundle, let the agent verify and time it; the report, with the agent as ``device``.

        `latencies`: also fetch every timed run's latency (``BenchReport.latencies_ms``, for plots).
        """
        config = config or BenchConfig()
        bundle = read_bundle(bundle_path, verify=False)  # a missing or malformed bundle: said before any upload
        info = self.info()
        agent = info["name"]
        runs = {t["name"]: t for t in info["targets"]}
        target = runs.get(bundle.target)
        if target is None or target.get("runs") is not True:
            why = target.get("detail") if target else "not a target it knows"
            raise DeviceTargetError(f"device {agent} ({self.url}) cannot run target {bundle.target} of bundle "
                                    f"{bundle_path}: {why}")
        tar, size, name = pack_bundle(bundle_path)
        with tar:
            limit = info["limits"].get("max_upload_bytes")
            if isinstance(limit, int) and size > limit:
                raise DeviceError(f"bundle {bundle_path} is {size} bytes as a tar; the agent {agent} takes at most "
                                  f"{limit} (its --max-upload-mb)")
            headers = {**self._headers(), "Content-Type": TAR_TYPE, "Content-Length": str(size)}
            query = bench_query(BenchRequest(name, config, latencies))
            request = Request(f"{self.url}{BENCH_PATH}?{query}", data=tar, headers=headers, method="POST")
            answer = self._call(request, self.timeout_s)
        try:
            report = read_bench_report(answer.get("report"), answer.get("latencies_ms") or ())
        except (BenchError, AttributeError, TypeError, ValueError) as e:
            raise DeviceError(f"the agent at {self.url} sent a report this edgegate cannot read: {one_line(e)}") from e
        device = {"name": agent, "url": self.url}
        return dataclasses.replace(report, bundle=str(bundle_path), device=device)

    # ------------------------------------------------------------------------------------ transport

    def _headers(self) -> dict[str, str]:
        return {"Authorization": AUTH_SCHEME + self.token, "Accept": JSON_TYPE}

    def _call(self, request: Request, timeout: float) -> Any:
        where = f"the device agent at {self.url}"
        try:
            with urlopen(request, timeout=timeout) as response:  # noqa: S310 (scheme checked: http/https)
                raw = response.read(MAX_ANSWER_BYTES + 1)
        except HTTPError as e:
            raise DeviceError(f"{where} refused: {_error_text(e)}") from None
        except URLError as e:
            reason = e.reason
            if isinstance(reason, (ConnectionResetError, BrokenPipeError, HTTPException)):
                raise DeviceError(f"{where} closed the connection before answering (stopped, killed mid-measurement "
                                  "or refused the upload); nothing was measured: check the agent and retry") from None
            if isinstance(reason, TimeoutError):
                raise DeviceError(f"no answer from {where} within {timeout:g} s; check the agent") from None
            raise DeviceError(f"cannot reach {where}: {one_line(reason, 160)}; is `edgegate device serve` "
                              "running there (and the URL right)?") from None
        except (HTTPException, ConnectionError) as e:  # dropped while the answer was being read
            raise DeviceError(f"{where} closed the connection before answering ({type(e).__name__}); nothing was "
                              "measured: check the agent and retry") from None
        except TimeoutError:
            raise DeviceError(f"no answer from {where} within {timeout:g} s; check the agent") from None
        if len(raw) > MAX_ANSWER_BYTES:
            raise DeviceError(f"{where} sent an answer over {MAX_ANSWER_BYTES >> 20} MiB; not an edgegate agent?")
        try:
            return json.loads(raw)
        except ValueError:
            raise DeviceError(f"{where} sent an answer that is not JSON; check the URL") from None


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _error_text(e: HTTPError) -> str:
    """The agent's one-line ``error``, or the HTTP status when the answer is not the agent's JSON."""
    try:
        body = json.loads(e.read(1 << 16))
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            return f"{one_line(body['error'], 600)} (HTTP {e.code})"
    except (ValueError, OSError, HTTPException):
        pass
    return f"HTTP {e.code} {one_line(e.reason, 80)}"
