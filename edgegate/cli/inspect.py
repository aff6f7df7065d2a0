"""`edgegate inspect`: what a bundle, a model file, an ONNX file or an engine holds (``--json``: all of it)."""

from __future__ import annotations

import argparse

from edgegate.cli._common import add_trust_flags
from edgegate.inspection import describe, to_json
from edgegate.reports.inspect_text import render_inspect


def cmd_inspect(args: argparse.Namespace) -> int:
    info = describe(args.path, trust_model=args.trust_model, model_class=args.model_class)
    print(to_json(info) if args.json else render_inspect(info, layers=args.layers))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("inspect", help="show what a bundle, model file, ONNX file or engine holds",
                       description="A bundle (read and verified with numpy + onnxruntime only): model, export, "
                       "quantization, coverage, gate fidelity, what stayed in higher precision, files, gates, ONNX "
                       "op counts. A model file: class, parameters, gates (needs the compile extra).")
    i.add_argument("path", help="a bundle directory, a model file (.pt, .safetensors, ...), an .onnx file or an "
                   "engine file")
    i.add_argument("--json", action="store_true", help="print everything as JSON (the raw manifest records)")
    i.add_argument("--layers", action="store_true", help="trt bundle or engine: list every engine layer")
    add_trust_flags(i)
    i.set_defaults(func=cmd_inspect)
