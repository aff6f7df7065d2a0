"""`edgegate inspect`: gates, op counts and metadata of a model file, an ONNX file or a bundle."""

from __future__ import annotations

import argparse

from edgegate.cli._common import add_trust_flags, console


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

    con = console()
    con.print(f"[bold]{info['path']}[/] ({info['kind']})")
    for key in ("format", "class", "target", "quant", "parameters", "sha256"):
        if info.get(key) is not None:
            con.print(f"  {key}: {info[key]}")
    gates = (info.get("gates") or {}).get("gates", [])
    if gates:
        table = Table("gate", "kind", "module", "details", title="gates")
        for g in gates:
            table.add_row(g["name"], g["kind"], g["module"], ", ".join(f"{k}={v}" for k, v in g["details"].items()))
        con.print(table)
    onnx_info = info.get("onnx") or (info if info["kind"] == "onnx" else None)
    if onnx_info:
        con.print(f"  opsets: {onnx_info['opsets']}  functions: {', '.join(onnx_info['functions']) or '-'}")
        table = Table("op", "count", title=f"ONNX ops ({onnx_info['nodes']} nodes, subgraphs included)")
        for op, n in onnx_info["op_counts"].items():
            table.add_row(op, str(n))
        con.print(table)
    if info.get("files"):
        con.print("  files: " + ", ".join(f"{k} ({v} B)" for k, v in info["files"].items()))
    engine = info.get("engine")
    if engine:
        con.print(f"  engine: {engine.get('flavor')} {engine.get('trt_version') or ''}, compute capability "
                      f"{', '.join(engine.get('compute_capabilities') or []) or '-'}; layers from {engine['source']}")
        table = Table("layer", "type", "precision", title=f"engine layers ({len(engine['layers'])})")
        for layer in engine["layers"]:  # the network listing's keys, else the engine inspector's
            name, kind = layer.get("name", layer.get("Name", "")), layer.get("type", layer.get("LayerType", ""))
            precision = ", ".join(layer.get("outputs", [])) or str(layer.get("Outputs", ""))[:60]
            table.add_row(str(name), str(kind), precision)
        con.print(table)


def register(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("inspect", help="show gates, ops and metadata of a model, ONNX file or bundle")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_trust_flags(i)
    i.set_defaults(func=cmd_inspect)
