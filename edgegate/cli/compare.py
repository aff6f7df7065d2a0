"""`edgegate compare`: a float model and its bundles side by side (accuracy, gate fidelity, latency)."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from edgegate.cli._common import Status, add_input_flag, add_trust_flags, int_at_least
from edgegate.cli.device import add_device_flags, device_client
from edgegate.loading.inputs import parse_inputs
from edgegate.reports.compare_text import render_text


def cmd_compare(args: argparse.Namespace) -> int:
    import json

    # loaded when the command runs: the CLI starts light, and a runtime-only install names the missing extra
    from edgegate.comparison import CompareConfig, compare

    if args.html:
        import matplotlib  # noqa: F401  (the report extra: say so now, not after minutes of comparing)
    config = CompareConfig(data=args.data, split=args.split, max_samples=args.max_samples, runs=args.runs,
                           warmup=args.warmup, baseline=args.baseline, trust_model=args.trust_model,
                           model_class=args.model_class, inputs=parse_inputs(args.input))
    client = device_client(args)  # --device: bundles are timed by the agent there, accuracy measured here
    measure = functools.partial(client.bench, latencies=True) if client else None  # latencies: for the plots
    with Status("compare") as status:
        report = compare(args.model, args.bundles, config, on_step=status.update, measure=measure)
    print(render_text(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    if args.html:
        # loaded when the command runs: the CLI starts light, and a runtime-only install names the missing extra
        from edgegate.reports.html import write_html

        print(f"wrote {write_html(report, args.html)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compare", help="float model vs bundles: accuracy, gate fidelity, per-layer SQNR, latency",
                       description="Needs the compile extra (torch, onnx); --html also the report extra.")
    c.add_argument("model", help="the model file (or Hugging Face folder) the bundles were exported from")
    c.add_argument("bundles", nargs="+", metavar="DIR", help="bundle directories written by `edgegate export`")
    c.add_argument("--data", required=True, metavar="NAME|FILE.npz",
                   help="evaluation data: a built-in dataset (its test split) or an .npz keyed by input name")
    c.add_argument("--split", choices=["train", "val", "test", "all"], default=None,
                   help="part of the data to use (default: test for built-ins, all for .npz)")
    c.add_argument("--max-samples", type=int_at_least(1), default=None, help="use at most this many samples")
    c.add_argument("--runs", type=int_at_least(1), default=100, help="timed runs per model for the latency columns")
    c.add_argument("--warmup", type=int_at_least(0), default=10, help="untimed runs per model before the timed ones")
    c.add_argument("--baseline", choices=["naive"], default=None,
                   help="naive: also export and compare a naive-calibration bundle per gate-aware int8 bundle")
    c.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    c.add_argument("--html", metavar="OUT.html", help="also write an HTML report with PNG plots (matplotlib)")
    add_input_flag(c)
    add_trust_flags(c)
    add_device_flags(c)
    c.set_defaults(func=cmd_compare)
