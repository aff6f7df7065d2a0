"""`edgegate device serve|info`: run the device agent, or show what an agent reports (edgegate.device)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from edgegate.cli._common import add_group, int_at_least, number, positive_seconds


def cmd_serve(args: argparse.Namespace) -> int:
    # loaded when the command runs: the CLI starts light, and a runtime-only install names the missing extra
    from edgegate.device import Agent, AgentConfig, TransferLimits, read_token

    limits = TransferLimits(max_bytes=int(args.max_upload_mb * (1 << 20)), seconds=args.upload_seconds)
    workdir = Path(args.workdir or _default_workdir())
    config = AgentConfig(token=read_token(args.token_file), workdir=workdir,
                         host=args.host, port=args.port, limits=limits, max_seconds=args.max_seconds,
                         job_seconds=args.job_seconds, queue_total=args.queue, queue_per_client=args.queue_per_client,
                         **({"name": args.name} if args.name else {}))
    # A server's access log is its output: each request, job and refusal, on stderr.
    logging.getLogger("edgegate.device").setLevel(logging.DEBUG if args.debug else logging.INFO)
    agent = Agent(config)
    runs = ", ".join(t["name"] for t in agent.info()["targets"] if t["runs"]) or "none"
    print(f"edgegate device agent {config.name} serving {agent.url} (targets: {runs}; workdir {workdir})", flush=True)
    try:
        agent.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM: the normal way to stop a server
        print("edgegate: device agent stopped", file=sys.stderr)
    finally:
        agent.close()
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    # loaded when the command runs: the CLI starts light, and a runtime-only install names the missing extra
    from edgegate.device import DeviceClient, read_token

    info = DeviceClient(args.url, read_token(args.token_file)).info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(render_info(info, args.url))
    return 0


def render_info(info: dict[str, Any], url: str) -> str:
    h, lim, q, g = (info.get(k) or {} for k in ("host", "limits", "queue", "gpus"))
    targets = "; ".join(f"{t.get('name')} {'yes' if t.get('runs') else 'no'} ({t.get('detail')})"
                        for t in info.get("targets", []))
    caps = g.get("compute_capabilities")
    gpus = ", ".join(f"sm_{c}" for c in caps) if isinstance(caps, list) and caps else f"none ({g.get('note')})"
    mib = (lim.get("max_upload_bytes") or 0) / (1 << 20)
    return "\n".join([
        f"=== edgegate device agent: {info.get('name')} ({url}) ===",
        f"edgegate     : {info.get('edgegate')}, Python {h.get('python')}, numpy {h.get('numpy')}",
        f"Host         : {h.get('cpus_usable')}/{h.get('cpu_count')} CPUs ({h.get('cpu_model')}), "
        f"{h.get('machine')} {h.get('system')}",
        f"Runtimes     : onnxruntime {h.get('onnxruntime')} [{', '.join(map(str, h.get('providers') or []))}]",
        f"GPUs         : {gpus}",
        f"Targets      : {targets}",
        f"Limits       : upload {mib:g} MiB, {lim.get('max_files')} files, {_g(lim.get('upload_seconds'))} s; timed "
        f"runs {_g(lim.get('max_seconds'))} s, job {_g(lim.get('job_seconds'))} s; queue {lim.get('queue_total')} "
        f"({lim.get('queue_per_client')} per client)",
        f"Queue        : {q.get('running', 0)} running, {q.get('waiting', 0)} waiting",
    ])


def _g(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def _default_workdir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "edgegate" / "agent"


_megabytes = number("a number of MiB", lambda v: 0 < v < 1 << 20, "must be a number of MiB > 0")


def add_device_flags(p: argparse.ArgumentParser) -> None:
    """``--device URL --token-file F`` for commands that can measure on a device agent."""
    p.add_argument("--device", metavar="URL", help="measure on the device agent at URL (`edgegate device serve`)")
    p.add_argument("--token-file", metavar="F", help="file holding the agent's token (needed with --device)")


def device_client(args: argparse.Namespace):
    """The `DeviceClient` for ``--device``/``--token-file``, or None without ``--device``."""
    # loaded when the command runs: the CLI starts light, and a runtime-only install names the missing extra
    from edgegate.device import DeviceClient, DeviceError, read_token

    if args.device is None:
        if args.token_file is not None:
            raise DeviceError("--token-file is for --device URL; give both, or neither to measure here")
        return None
    if args.token_file is None:
        raise DeviceError(f"--device {args.device} needs --token-file F (the file holding the agent's token)")
    return DeviceClient(args.device, read_token(args.token_file))


def register(sub: argparse._SubParsersAction) -> None:
    dsub = add_group(sub, "device", "{serve,info}",
                     help="measure on an edge device over the network: the agent and its info",
                     description="`serve` runs on the device with the runtime install only (numpy, onnxruntime, "
                     "the served target's runtime); `bench`/`compare --device URL --token-file F` measure on it.")
    s = dsub.add_parser("serve", help="run the device agent (on the device: numpy + onnxruntime + target runtime)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback; off a trusted network put TLS or an SSH tunnel "
                        "in front, see SECURITY.md)")
    s.add_argument("--port", type=int_at_least(0), default=8765, help="TCP port (0: any free port; printed)")
    s.add_argument("--token-file", required=True, metavar="F", help="file holding the shared token (chmod 600)")
    s.add_argument("--workdir", metavar="D", help="private folder for uploads (default ~/.cache/edgegate/agent)")
    s.add_argument("--name", help="device name in reports (default: the host name)")
    s.add_argument("--max-upload-mb", type=_megabytes, default=512.0, metavar="MB", help="largest bundle upload")
    s.add_argument("--upload-seconds", type=positive_seconds, default=120.0, metavar="S",
                   help="time limit to receive an upload")
    s.add_argument("--max-seconds", type=positive_seconds, default=300.0, metavar="S",
                   help="cap on one job's timed runs")
    s.add_argument("--job-seconds", type=positive_seconds, default=600.0, metavar="S",
                   help="a measurement (load, golden check, warm-up, runs) is stopped after this")
    s.add_argument("--queue", type=int_at_least(1), default=16, metavar="N",
                   help="jobs admitted at once (running + waiting)")
    s.add_argument("--queue-per-client", type=int_at_least(1), default=4, metavar="N",
                   help="jobs admitted per client address")
    s.set_defaults(func=cmd_serve)
    i = dsub.add_parser("info", help="what a device agent can run: targets, runtimes, CPUs/GPUs, limits, queue")
    i.add_argument("url", help="the agent's URL, e.g. http://127.0.0.1:8765")
    i.add_argument("--token-file", required=True, metavar="F", help="file holding the agent's token")
    i.add_argument("--json", action="store_true", help="print the agent's edgegate.device JSON")
    i.set_defaults(func=cmd_info)
