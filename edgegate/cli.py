"""Command line: thin subcommands over the library (export, inspect, bench, compare, targets, zoo).

Errors the user can fix (``EdgegateError``) print as one line on stderr and exit with code 2;
``--debug`` shows the traceback. An interrupted run exits 130 and leaves no partial bundle.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from edgegate.errors import EdgegateError, os_error_text

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _console():
    from rich.console import Console

    return Console(highlight=False)


def cmd_export(args: argparse.Namespace) -> int:
    from edgegate.pipeline import ExportConfig, run_export

    out = Path(args.output) if args.output else Path(args.model).with_suffix(".edgegate")
    config = ExportConfig(target=args.target, quant=args.quant, calib=args.calib, observer=args.observer,
                          gate_precision=args.gate_precision, calibration=args.calibration, lowrank=args.lowrank,
                          min_coverage=args.min_coverage,
                          batch=args.batch, exit_form=args.exit_form,
                          trust_model=args.trust_model, model_class=args.model_class,
                          overwrite=args.overwrite, keep_intermediate=args.keep_intermediate,
                          target_options=_target_options(args))
    console = _console()
    with console.status("exporting") as status:
        def on_step(step: str) -> None:
            check_interrupted()
            status.update(f"export: {step}")

        path = run_export(args.model, out, config, on_step=on_step)
    from edgegate.bundle import read_bundle

    m = read_bundle(path).manifest
    steps = ", ".join(f"{k} {v:.2f}s" for k, v in m["timings_s"].items())
    gates = m["gates"].get("gates", [])
    console.print(f"wrote [bold]{path}[/] for target {m['target']} ({len(gates)} gates; {steps})")
    return 0


def _key_values(items: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EdgegateError(f"{flag} {item!r} must look like KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _target_options(args: argparse.Namespace) -> dict[str, str]:
    options = _key_values(args.target_option, "--target-option")
    for flag, key, value in (("--trt-flavor", "flavor", args.trt_flavor), ("--timesteps", "timesteps", args.timesteps)):
        if value is not None:
            if key in options and options[key] != str(value):
                raise EdgegateError(f"{flag} {value} contradicts --target-option {key}={options[key]}; give one")
            options[key] = str(value)
    return options


def cmd_inspect(args: argparse.Namespace) -> int:
    from edgegate.inspection import describe, to_json

    info = describe(args.path, trust_model=args.trust_model, model_class=args.model_class)
    if args.json:
        print(to_json(info))
        return 0
    _render_info(info)
    return 0


def _render_info(info: dict) -> None:
    from rich.table import Table

    console = _console()
    console.print(f"[bold]{info['path']}[/] ({info['kind']})")
    for key in ("format", "class", "target", "quant", "parameters", "sha256"):
        if info.get(key) is not None:
            console.print(f"  {key}: {info[key]}")
    gates = (info.get("gates") or {}).get("gates", [])
    if gates:
        table = Table("gate", "kind", "module", "details", title="gates")
        for g in gates:
            table.add_row(g["name"], g["kind"], g["module"], ", ".join(f"{k}={v}" for k, v in g["details"].items()))
        console.print(table)
    onnx_info = info.get("onnx") or (info if info["kind"] == "onnx" else None)
    if onnx_info:
        console.print(f"  opsets: {onnx_info['opsets']}  functions: {', '.join(onnx_info['functions']) or '-'}")
        table = Table("op", "count", title=f"ONNX ops ({onnx_info['nodes']} nodes, subgraphs included)")
        for op, n in onnx_info["op_counts"].items():
            table.add_row(op, str(n))
        console.print(table)
    if info.get("files"):
        console.print("  files: " + ", ".join(f"{k} ({v} B)" for k, v in info["files"].items()))
    engine = info.get("engine")
    if engine:
        console.print(f"  engine: {engine.get('flavor')} {engine.get('trt_version') or ''}, compute capability "
                      f"{', '.join(engine.get('compute_capabilities') or []) or '-'}; layers from {engine['source']}")
        table = Table("layer", "type", "precision", title=f"engine layers ({len(engine['layers'])})")
        for layer in engine["layers"]:  # the network listing's keys, else the engine inspector's
            name, kind = layer.get("name", layer.get("Name", "")), layer.get("type", layer.get("LayerType", ""))
            precision = ", ".join(layer.get("outputs", [])) or str(layer.get("Outputs", ""))[:60]
            table.add_row(str(name), str(kind), precision)
        console.print(table)


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from edgegate.bench import BenchConfig, bench, render_text

    config = BenchConfig(runs=args.runs, warmup=args.warmup, threads=args.threads, batch=args.batch,
                         seed=args.seed, max_seconds=args.max_seconds)
    bar, progress = None, None
    if sys.stdout.isatty():
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
        report = bench(args.bundle, config, progress=progress)
    finally:
        if bar is not None:
            bar.stop()
    print(render_text(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import json

    from edgegate.compare import CompareConfig, compare
    from edgegate.reports.compare_text import render_text

    config = CompareConfig(data=args.data, split=args.split, max_samples=args.max_samples, runs=args.runs,
                           warmup=args.warmup, baseline=args.baseline, trust_model=args.trust_model,
                           model_class=args.model_class)
    if sys.stdout.isatty():
        with _console().status("compare") as status:
            report = compare(args.model, args.bundles, config, on_step=lambda s: status.update(f"compare: {s}"))
    else:
        report = compare(args.model, args.bundles, config)
    print(render_text(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    if args.html:
        from edgegate.reports.html import write_html

        print(f"wrote {write_html(report, args.html)}")
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from rich.table import Table

    from edgegate import targets

    table = Table("target", "builds here", "runs here", "description / what to do")
    for t in targets.all_targets():
        ok, why = t.is_available()
        runs, run_why = targets.can_run(t) if ok else (False, why)
        text = t.description if runs else why if not ok else f"{t.description}; {run_why}"
        table.add_row(t.name, "yes" if ok else "no", "yes" if runs else "no", text)
    _console().print(table)
    return 0


def cmd_zoo_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from edgegate import zoo

    table = Table("name", "family", "dataset", "description")
    for e in zoo.list_models():
        table.add_row(e.name, e.family, e.dataset, e.description)
    _console().print(table)
    return 0


def cmd_zoo_train(args: argparse.Namespace) -> int:
    from edgegate import zoo

    console = _console()
    with console.status(f"training {args.name}"):
        path = zoo.train_and_save(args.name, args.output, seed=args.seed)
    from edgegate.loading import load

    metrics = (load(path).spec.get("meta") or {}).get("metrics", {})
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    console.print(f"wrote [bold]{path}[/] ({shown})")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error (subcommands inherit it)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"edgegate: error: {message} (see `{self.prog} --help`)\n")


def _int_at_least(minimum: int):
    """An argparse type: an int >= `minimum` (negative batch sizes and ranks are refused up front)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgegate", description="Deploy conditional-computation networks to edge targets.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)

    def trust(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--trust-model", action="store_true",
                        help="allow model formats that run code when loaded (full pickles, TorchScript, .pt2)")
        sp.add_argument("--model", dest="model_class", metavar="CLASS_PATH",
                        help="module.path:Class that rebuilds a plain state_dict or a non-edgegate checkpoint")

    e = sub.add_parser("export", help="quantize, export and compile a model into a bundle directory")
    e.add_argument("model", help="model file (edgegate checkpoint, state_dict, ...)")
    e.add_argument("--target", default="cpu", help="target name (see `edgegate targets`)")
    e.add_argument("-o", "--output", help="bundle directory to write (default: MODEL.edgegate)")
    e.add_argument("--quant", default="fp32", choices=["fp32", "fp16", "int8", "ternary"],
                   help="int8: gate-aware calibrated INT8; ternary: dense Linear layers as packed 2-bit weights; "
                   "fp16: a float graph the target builds in half precision (trt)")
    e.add_argument("-O", "--target-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a target-specific compile option (repeatable); see `edgegate targets`")
    e.add_argument("--trt-flavor", choices=["auto", "tensorrt", "rtx"], default=None,
                   help="trt: datacenter/Jetson TensorRT or TensorRT for RTX (same as -O flavor=...)")
    e.add_argument("--timesteps", type=_int_at_least(1), default=None, metavar="T",
                   help="snn: simulation timesteps per input (same as -O timesteps=T)")
    e.add_argument("--calib", metavar="NAME|FILE.npz",
                   help="calibration data: a built-in dataset or an .npz keyed by input name "
                   "(default: the dataset the checkpoint was trained on)")
    e.add_argument("--observer", default="percentile", choices=["minmax", "percentile", "mse"],
                   help="activation range observer (int8)")
    e.add_argument("--gate-precision", choices=["float", "int8"], default=None,
                   help="routers, exit heads and gate predictors: keep float (default) or quantize them too")
    e.add_argument("--calibration", default="gate_aware", choices=["gate_aware", "naive"],
                   help="naive: every quantizer sees all data and gates are quantized (a baseline)")
    e.add_argument("--min-coverage", type=int, default=32, metavar="ROWS",
                   help="calibration rows each quantizer must see; below it calibration is augmented")
    e.add_argument("--lowrank", type=_int_at_least(0), default=0, metavar="R",
                   help="with --quant ternary: add a rank-R float correction fitted to the ternary error")
    e.add_argument("--batch", type=_int_at_least(1), default=None, help="static batch size (default: dynamic)")
    e.add_argument("--exit-form", default="auto", choices=["auto", "if", "compact"],
                   help="early exit as ONNX If (batch 1) or batch compaction (auto: If when --batch 1)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    e.add_argument("--keep-intermediate", action="store_true", help="keep each step's output in OUTPUT.steps/")
    trust(e)
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("inspect", help="show gates, ops and metadata of a model, ONNX file or bundle")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print JSON instead of tables")
    trust(i)
    i.set_defaults(func=cmd_inspect)

    b = sub.add_parser("bench", help="check a bundle against its golden I/O, then time it on this device")
    b.add_argument("bundle", help="bundle directory written by `edgegate export`")
    b.add_argument("--runs", type=int, default=200)
    b.add_argument("--warmup", type=int, default=20)
    b.add_argument("--threads", type=int, default=None, help="intra-op threads (0: the runtime picks)")
    b.add_argument("--batch", type=int, default=None, help="batch per run (default: bundle batch, else 1)")
    b.add_argument("--seed", type=int, default=0, help="order of the golden samples fed")
    b.add_argument("--max-seconds", type=float, default=None, help="cap on the timed runs")
    b.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    b.set_defaults(func=cmd_bench)

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
    trust(c)
    c.set_defaults(func=cmd_compare)

    t = sub.add_parser("targets", help="list targets and whether each can run here")
    t.set_defaults(func=cmd_targets)

    z = sub.add_parser("zoo", help="tiny reference models of each gated family")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zl = zsub.add_parser("list", help="list zoo models")
    zl.set_defaults(func=cmd_zoo_list)
    zt = zsub.add_parser("train", help="train a zoo model deterministically and save it")
    zt.add_argument("name")
    zt.add_argument("-o", "--output", required=True, help="checkpoint path to write, e.g. model.pt")
    zt.add_argument("--seed", type=int, default=0)
    zt.set_defaults(func=cmd_zoo_train)
    return p


_INTERRUPTED = threading.Event()


def _raise_interrupt(signum, frame) -> None:
    # Remembered as well as raised: a KeyboardInterrupt raised inside a library's import machinery or a
    # finalizer can be swallowed there, so long commands re-check the flag between steps.
    _INTERRUPTED.set()
    raise KeyboardInterrupt


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if SIGINT/SIGTERM arrived, even if a library swallowed the first one."""
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM unwinds like Ctrl-C, so temp directories are removed and no partial bundle is left.
    _INTERRUPTED.clear()
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        return args.func(args)
    except EdgegateError as e:
        if args.debug:
            raise
        print(f"edgegate: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("edgegate: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into e.g. `head`: not an error of ours
        sys.stderr.close()
        return 0
    except OSError as e:  # a file we were asked to read or write: missing, unwritable, disk full
        if args.debug:
            raise
        print(f"edgegate: error: {os_error_text(e)}; check the path, free space and permissions", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
