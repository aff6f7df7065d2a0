"""`edgegate bench`: golden self-check of a bundle, then its latency on this device."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgegate.cli.device import add_device_flags, device_client


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from edgegate.benchmark import BenchConfig, bench, render_text

    config = BenchConfig(runs=args.runs, warmup=args.warmup, threads=args.threads, batch=args.batch,
                         seed=args.seed, max_seconds=args.max_seconds)
    client = device_client(args)  # --device: measured by the agent there; the report names it
    bar, progress = None, None
    if client is None and sys.stdout.isatty():
        try:  # rich comes with the compile extra; a runtime-only device simply gets no bar
            from rich.progress import Progress

            bar = Progress(transient=True)
            bar.start()
            task = bar.add_task("bench", total=args.warmup + args.runs)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done)
        except ImportError:
            pass
    try:
        report = client.bench(args.bundle, config) if client else bench(args.bundle, config, progress=progress)
    finally:
        if bar is not None:
            bar.stop()
    print(render_text(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="check a bundle against its golden I/O, then time it on this device")
    b.add_argument("bundle", help="bundle directory written by `edgegate export`")
    b.add_argument("--runs", type=int, default=200)
    b.add_argument("--warmup", type=int, default=20)
    b.add_argument("--threads", type=int, default=None, help="intra-op threads (0: the runtime picks)")
    b.add_argument("--batch", type=int, default=None, help="batch per run (default: bundle batch, else 1)")
    b.add_argument("--seed", type=int, default=0, help="order of the golden samples fed")
    b.add_argument("--max-seconds", type=float, default=None, help="cap on the timed runs")
    b.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    add_device_flags(b)
    b.set_defaults(func=cmd_bench)
