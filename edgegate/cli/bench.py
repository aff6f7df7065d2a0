"""`edgegate bench`: golden self-check of a bundle, then its latency on this device (numpy + the runtime only)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgegate.cli._common import Status, int_at_least, positive_seconds
from edgegate.cli.device import add_device_flags, device_client
from edgegate.reports.bench_text import render_text


def cmd_bench(args: argparse.Namespace) -> int:
    # loaded when the command runs: the CLI starts light, and a runtime-only install names the missing extra
    from edgegate.benchmark import BenchConfig, bench

    config = BenchConfig(runs=args.runs, warmup=args.warmup, threads=args.threads, batch=args.batch,
                         seed=args.seed, max_seconds=args.max_seconds, min_seconds=args.min_seconds)
    client = device_client(args)  # --device: measured by the agent there; the report names it
    with Status("bench") as status:
        def progress(done: int, total: int | None) -> None:
            status.update(f"{done}/{total} runs" if total else f"{done} runs", force=False)

        if client is not None:
            status.update(f"measuring on {client.url}")
        report = client.bench(args.bundle, config) if client else bench(args.bundle, config, progress=progress)
    print(render_text(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    # loaded when the command runs: the CLI starts light, and a runtime-only install names the missing extra
    from edgegate.benchmark import BUDGET_MAX_SECONDS, BUDGET_MIN_RUNS, BUDGET_MIN_SECONDS, WARMUP_MIN_SECONDS

    b = sub.add_parser("bench", help="check a bundle against its golden I/O, then time it on this device",
                       description="Needs numpy + the bundle target's runtime only. By default the timed runs go "
                       f"on until both {BUDGET_MIN_RUNS} runs and --min-seconds have passed (capped at "
                       f"{BUDGET_MAX_SECONDS:g} s), so the median is stable.")
    b.add_argument("bundle", help="bundle directory written by `edgegate export`")
    b.add_argument("--runs", type=int_at_least(1), default=None,
                   help=f"exactly this many timed runs (default: a time budget, >= {BUDGET_MIN_RUNS} runs and "
                   ">= --min-seconds)")
    b.add_argument("--min-seconds", type=positive_seconds, default=BUDGET_MIN_SECONDS, metavar="S",
                   help="time budget: time runs for at least this long (ignored with --runs)")
    b.add_argument("--max-seconds", type=positive_seconds, default=None, metavar="S",
                   help=f"stop the timed runs after this long (default: {BUDGET_MAX_SECONDS:g} under the time "
                   "budget, no cap with --runs)")
    b.add_argument("--warmup", type=int_at_least(0), default=None, metavar="N",
                   help=f"untimed runs before timing (default: as many as fill {WARMUP_MIN_SECONDS:g} s)")
    b.add_argument("--threads", type=int_at_least(0), default=None,
                   help="intra-op threads (default: as recorded in the bundle; 0: the runtime picks)")
    b.add_argument("--batch", type=int_at_least(1), default=None,
                   help="batch per run (default: the bundle's static batch, else 1)")
    b.add_argument("--seed", type=int_at_least(0), default=0, help="order in which the golden samples are fed")
    b.add_argument("--json", metavar="OUT", help="also write the report as JSON to this file")
    add_device_flags(b)
    b.set_defaults(func=cmd_bench)
