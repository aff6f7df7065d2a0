"""`edgegate export`: load, find gates, calibrate/quantize, export ONNX, compile, write a bundle."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from edgegate.bundle import read_bundle
from edgegate.cli._common import (
    Status,
    add_input_flag,
    add_trust_flags,
    check_interrupted,
    fraction,
    int_at_least,
    number,
)
from edgegate.errors import EdgegateError
from edgegate.loading.inputs import parse_inputs
from edgegate.quantization.config import DEFAULT_FIDELITY_TARGET
from edgegate.reports.export_text import render_export
from edgegate.schemes import QuantScheme


def cmd_export(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    # loaded when the command runs: the CLI starts light, and a runtime-only install names the missing extra
    from edgegate.bundle_write import check_destination
    from edgegate.pipeline import ExportConfig, run_export

    out = Path(args.output) if args.output else Path(args.model).with_suffix(".edgegate")
    inputs = [Path(args.model)] + ([Path(args.calib)] if args.calib and Path(args.calib).exists() else [])
    check_destination(out, args.overwrite, keep=inputs)  # before minutes of work, naming the -o at fault
    config = ExportConfig(target=args.target, quant=args.quant, calib=args.calib, holdout=args.holdout,
                          inputs=parse_inputs(args.input), observer=args.observer,
                          gate_precision=args.gate_precision, calibration=args.calibration, lowrank=args.lowrank,
                          min_coverage=args.min_coverage, fidelity_target=args.fidelity_target,
                          batch=args.batch, exit_form=args.exit_form, moe_skip=args.moe_skip,
                          moe_skip_budget=args.moe_skip_budget / 100,
                          trust_model=args.trust_model, model_class=args.model_class,
                          overwrite=args.overwrite, keep_intermediate=args.keep_intermediate,
                          target_options=_target_options(args))
    began: dict[str, float] = {}  # step -> when it started, in run order (the manifest keys them alphabetically)
    with Status("export") as status:
        status.update("import")  # torch, onnx and brevitas take seconds to import: say so at once

        def on_step(step: str) -> None:
            check_interrupted()
            began.setdefault(step, time.perf_counter())
            status.update(step)

        path = run_export(args.model, out, config, on_step=on_step)
    finished = time.perf_counter()
    manifest = read_bundle(path).manifest
    timings = manifest.get("timings_s") or {}
    # Before the first step, run_export imports torch, onnx and brevitas (and checks its arguments: ms).
    steps = {"import": min(began.values(), default=finished) - started}
    steps.update((s, timings[s] if s in timings else finished - t) for s, t in began.items())
    print(render_export(path, manifest, steps, finished - started))
    for warning in (manifest.get("quant") or {}).get("warnings") or []:  # also in the manifest and in the summary
        print(f"edgegate: warning: {warning}", file=sys.stderr)
    return 0


# --fidelity-target: a fraction in [0, 1]; 0 turns the search off
_target = number("a number", lambda v: 0 <= v <= 1, "must be between 0 and 1 (e.g. 0.995; 0 turns the search off)")


def _key_values(items: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EdgegateError(f"{flag} {item!r} must look like KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _target_options(args: argparse.Namespace) -> dict[str, str]:
    return _key_values(args.target_option, "--target-option")


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("export", help="quantize, export and compile a model into a bundle directory",
                       description="Load a model, find its gates, calibrate/quantize, export ONNX with edgegate "
                       "ops, compile for a target and write a verified bundle directory. Needs the compile extra.")
    e.add_argument("model", help="model file: edgegate checkpoint, state_dict (with --model), Hugging Face folder "
                   "(config.json + *.safetensors), or a format that needs --trust-model")
    e.add_argument("--target", default="cpu", help="cpu, trt or snn (see `edgegate targets`)")
    e.add_argument("-o", "--output", help="bundle directory to write (default: MODEL.edgegate)")
    e.add_argument("--quant", default="fp32", choices=list(QuantScheme),
                   help="int8: gate-aware calibrated INT8; ternary: dense Linear layers as packed 2-bit weights; "
                   "fp16: a float graph the target builds in half precision (trt)")
    e.add_argument("-O", "--target-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a compile option of the target (repeatable), e.g. trt: -O flavor=rtx, snn: -O timesteps=64; "
                   "`edgegate targets` lists each target's options")
    e.add_argument("--calib", metavar="NAME|FILE.npz",
                   help="calibration data: a built-in dataset or an .npz keyed by input name "
                   "(default: the dataset the checkpoint was trained on)")
    e.add_argument("--holdout", type=fraction, default=None, metavar="FRACTION",
                   help="set this share of a --calib file's rows aside (the same rows every run) to measure gate "
                   "fidelity; without it the whole file calibrates and fidelity is measured on it")
    add_input_flag(e)
    e.add_argument("--observer", default="percentile", choices=["minmax", "percentile", "mse"],
                   help="activation range observer (int8)")
    e.add_argument("--gate-precision", choices=["float", "int8"], default=None,
                   help="routers, exit heads and gate predictors: keep float (default) or quantize them too")
    e.add_argument("--calibration", default="gate_aware", choices=["gate_aware", "naive"],
                   help="naive: every quantizer sees all data and gates are quantized (a baseline)")
    e.add_argument("--min-coverage", type=int, default=32, metavar="ROWS",
                   help="calibration rows each quantizer must see; below it calibration is augmented")
    e.add_argument("--fidelity-target", type=_target, default=DEFAULT_FIDELITY_TARGET, metavar="FRACTION",
                   help="int8, gate-aware: the agreement with the float model every gate keeps on the calibration "
                   "rows (exit, top-k set, top-1 expert, 1 - mask Hamming; top-1 when the only gates are soft); the "
                   "cheapest means that meets it is chosen and recorded, a miss is a warning (0: no search)")
    e.add_argument("--lowrank", type=int_at_least(0), default=0, metavar="R",
                   help="with --quant ternary: add a rank-R float correction fitted to the ternary error")
    e.add_argument("--batch", type=int_at_least(1), default=None, help="static batch size (default: dynamic)")
    e.add_argument("--exit-form", default="auto", choices=["auto", "if", "compact"],
                   help="early exit as ONNX If (batch 1) or batch compaction (auto: If when --batch 1)")
    e.add_argument("--moe-skip", default="off", metavar="auto|off|TAU",
                   help="MoDES dynamic expert skipping: a routed slot with alpha_l * weight < TAU gets weight 0 "
                   "(alpha_l: each MoE layer's importance, calibrated on --calib data); auto searches the largest "
                   "TAU whose accuracy (LMs: loss) stays within --moe-skip-budget of no skipping")
    e.add_argument("--moe-skip-budget", type=float, default=0.5, metavar="PT",
                   help="with --moe-skip auto: accuracy points the search may lose (LMs: percent of loss)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an existing edgegate bundle at -o (only a verified bundle, never another directory)")
    e.add_argument("--keep-intermediate", action="store_true", help="keep each step's output in OUTPUT.steps/")
    add_trust_flags(e)
    e.set_defaults(func=cmd_export)
