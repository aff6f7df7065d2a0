"""`edgegate sweep`: each cell of a spec (models x targets x quant variants) as a Ray task -> sweep.json, report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgegate.cli._common import EXIT_INTERRUPTED, Status, int_at_least
from edgegate.errors import EdgegateError

BAR_WIDTH = 20


def cmd_sweep(args: argparse.Namespace) -> int:
    from edgegate.sweep import RayOptions, expand, load_spec, render_text, run_sweep
    from edgegate.sweep.store import SWEEP_JSON, read_sweep_json, recorded_spec

    out = Path(args.output)
    if args.spec:
        spec = load_spec(args.spec)
    elif args.resume:
        spec = recorded_spec(out)
    else:
        raise EdgegateError("give the sweep's SPEC.toml, or --resume to finish the sweep recorded in -o DIR")
    ray_options = RayOptions(address=args.ray_address, num_cpus=args.num_cpus)
    total = len(expand(spec))
    try:
        # A progress bar over cells on stderr, only when it is a terminal (Status); the table goes to stdout.
        with Status("sweep") as status:
            status.update(_bar(0, total, "starting"))

            def on_row(row: dict, done: int, total: int) -> None:
                status.update(_bar(done, total, f"{row['name']}: {row['status']}"))

            result = run_sweep(spec, out, ray_options, on_row=on_row)
    except KeyboardInterrupt:
        print(f"edgegate: interrupted; {_finished(out)} finished cells are kept in {out} (run the sweep again, "
              f"or `edgegate sweep --resume -o {out}`, to do the rest)", file=sys.stderr)
        return EXIT_INTERRUPTED
    sweep = read_sweep_json(out)
    print(render_text(sweep))
    s = sweep["summary"]
    report = f", {out / result.report.name}" if result.report else " (no report.html: no cell finished ok)"
    print(f"{s['cells']} cells: {s['ok']} ok, {s['error']} error, {s['cached']} from the cache; "
          f"{result.wall_s:.1f} s; wrote {out / SWEEP_JSON}{report}")
    return 0


def _bar(done: int, total: int, last: str) -> str:
    filled = BAR_WIDTH * done // max(total, 1)
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total} cells; {last}"


def _finished(out: Path) -> int:
    from edgegate.sweep.store import read_sweep_json

    try:
        return int(read_sweep_json(out)["summary"]["ok"])
    except (EdgegateError, KeyError, TypeError, ValueError):
        return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sweep", help="export, compare and bench every cell of a sweep spec on Ray; Pareto report",
                       description="Needs the compile, report and cluster extras. Cells run on a local Ray started "
                       "for the run, or on the cluster at --ray-address; finished cells in DIR are reused.")
    s.add_argument("spec", nargs="?", metavar="SPEC.toml", help="the sweep spec (README, Sweeps)")
    s.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="output folder: sweep.json, report.html, cells/<key>/bundle (an earlier sweep's folder: "
                   "finished cells are reused)")
    s.add_argument("--resume", action="store_true",
                   help="finish the sweep recorded in DIR (its spec is in DIR/sweep.json; SPEC.toml not needed)")
    s.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: start a local Ray)")
    s.add_argument("--num-cpus", type=int_at_least(1), default=None, metavar="N",
                   help="CPUs of the local Ray (default: all of this machine's)")
    s.set_defaults(func=cmd_sweep)
