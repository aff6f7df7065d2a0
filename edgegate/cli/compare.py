"""`edgegate compare`: a float model and its bundles side by side (accuracy, gate fidelity, latency)."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from edgegate.cli._common import add_trust_flags, console
from edgegate.cli.device import add_device_flags, device_client


def cmd_compare(args: argparse.Namespace) -> int:
    import json

    from edgegate.comparison import CompareConfig, compare
    from edgegate.reports.compare_text import render_text

    config = CompareConfig(data=args.data, split=args.split, max_samples=args.max_samples, runs=args.runs,
                           warmup=args.warmup, baseline=args.baseline, trust_model=args.trust_model,
                           model_class=args.model_class)
    client = device_client(args)  # --device: bundles are timed by the agent there, accuracy measured here
    measure = functools.partial(client.bench, latencies=True) if client else None  # latencies: for the plots
    if sys.stdout.isatty():
        with console().status("compare") as status:
            report = compare(args.model, args.bundles, config, on_step=lambda s: status.update(f"compare: {s}"),
                             measure=measure)
    else:
        report = compare(args.model, args.bundles, config, measure=measure)
    print(render_text(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    if args.html:
        from edgegate.reports.html import write_html

        print(f"wrote {write_html(report, args.html)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compare", help="float model vs bundles: accuracy, gate fidelity, per-layer SQNR, latency")
    c.add_argument("model", help="the model file the bundles were exported from")
    c.add_argument("bundles", nargs="+", metavar="DIR", help="bundle directories written by `edgegate export`")
    c.add_argument("--data", required=True, metavar="NAME|FILE.npz",
                   help="evaluation data: a built-in dataset (its test split) or an .npz keyed by input name")
    c.add_argument("--split", choices=["train", "val", "test", "all"], default=None,
                   help="part of the data to use (default: test for built-ins, all for .npz)")
    c.add_argument("--max-samples", type=int, default=None, help="use at most this many samples")
    c.add_argument("--runs", type=int, default=100, help="timed runs per model for latency")
    c.add_argument("--warmup", type=int, default=10)
    c.add_argument("--baseline", choices=["naive"], default=None,
                   help="naive: also export and compare a naive-calibration bundle per gate-aware int8 bundle")
    c.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    c.add_argument("--html", metavar="OUT.html", help="also write an HTML report with PNG plots (matplotlib)")
    add_trust_flags(c)
    add_device_flags(c)
    c.set_defaults(func=cmd_compare)
