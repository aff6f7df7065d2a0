"""The agent's runtime process: probes the device, or measures one uploaded bundle.

Input (command line): ``describe``, or ``bench BUNDLE_DIR REQUEST_JSON`` (the bundle folder inside a job
folder; the `BenchConfig` as a dict, whether to keep every latency, and what the agent adds to the report:
the bundle's name as the client sent it, ``device``, the seconds queued). Output: one JSON line on stdout:
for ``describe`` the targets this device can run (and why not), host and GPUs; for ``bench`` the agent's
whole answer ``{"report": ..., "latencies_ms": [...], "queued_s": s}``, which the agent streams to the
client unread; on a refusal ``{"error": "<one line>"}`` with exit code 2.

The agent itself never imports a runtime: it starts this process, fresh, for each measurement (and once
at start-up to probe the targets). So a report's peak memory is the bundle's alone, as in a local
``edgegate bench`` (a child's peak RSS starts from its parent's, so the parent must stay small), a runtime
that crashes on a hostile model takes down only this process, and the agent's threads never share an
interpreter lock with the timed loop. The bench is ``edgegate.benchmark.bench``: ``read_bundle`` with
sha256 verification, the target's ``can_run``, the golden check, the timed runs.

When the agent dies (killed mid-measurement), its end of our stdin closes; a watcher thread then ends
this process, so no orphan keeps measuring for nobody.

Runtime side: numpy + the bundle target's runtime only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import threading
from typing import Any

from edgegate import targets
from edgegate.benchmark import BenchConfig, bench
from edgegate.errors import EdgegateError, one_line
from edgegate.reports.stats import host_info
from edgegate.targets import trt_api

EXIT_REFUSED = 2


def describe() -> dict[str, Any]:
    """Targets ({name, runs, detail}), host (CPUs, runtimes, versions) and NVIDIA GPUs of this device."""
    found = []
    for t in targets.all_targets():
        ok, why = t.is_available()
        runs, detail = targets.can_run(t) if ok else (False, why)
        found.append({"name": t.name, "runs": runs, "detail": detail})
    caps, none_why = trt_api.gpus()
    return {"targets": found, "host": {**host_info(), "cpu_model": _cpu_model()},
            "gpus": {"compute_capabilities": caps, "note": none_why}}


def measure(bundle: str, request_json: str) -> dict[str, Any]:
    """The agent's whole answer: the report (named as the client sent it, ``device`` set), latencies, queue time."""
    request = json.loads(request_json)
    report = bench(bundle, BenchConfig(**request["config"]), keep_latencies=request["latencies"])
    report = dataclasses.replace(report, bundle=request["bundle"], device=request["device"])
    return {"report": report.to_dict(), "latencies_ms": list(report.latencies_ms), "queued_s": request["queued_s"]}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _exit_when_agent_dies() -> None:
    # os.read, not sys.stdin: a daemon thread blocked inside a buffered reader aborts interpreter shutdown.
    while os.read(0, 4096):  # blocks until the agent closes the pipe (or dies)
        pass
    os._exit(3)


def main(argv: list[str]) -> int:
    threading.Thread(target=_exit_when_agent_dies, daemon=True).start()
    try:
        out = describe() if argv == ["describe"] else measure(*argv[1:]) if argv[:1] == ["bench"] else None
    except EdgegateError as e:
        print(json.dumps({"error": one_line(e, 1000)}), flush=True)
        return EXIT_REFUSED
    if out is None:
        print(json.dumps({"error": "usage: python -m edgegate.device.worker describe | bench DIR REQUEST_JSON"}))
        return EXIT_REFUSED
    print(json.dumps(out, allow_nan=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
