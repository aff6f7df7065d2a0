"""The terminal form of ``edgegate inspect``: a described path (``inspection.describe``) -> plain text.

Input: the dict ``describe`` returns for a bundle, a model file, an ONNX file or an engine file. Output:
a heading, labelled lines (for a bundle: the manifest summary of ``bundle_text``), the gate table, the
ONNX op counts packed into a few lines, and a TensorRT engine's layer table only when asked
(``--layers``: a real engine has hundreds). Standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgegate.reports.bundle_text import bundle_lines, gate_label
from edgegate.reports.text import labelled, num, pack, table

__all__ = ["render_inspect"]


def render_inspect(info: Mapping[str, Any], *, layers: bool = False) -> str:
    kind = info.get("kind")
    what = {"bundle": f"bundle for target {info.get('target')}, every file's sha256 verified",
            "model": "Hugging Face model folder" if info.get("format") == "hf-folder" else "model file",
            "onnx": "ONNX model", "engine": "TensorRT engine"}.get(str(kind), str(kind))
    lines = [f"=== edgegate inspect: {info.get('path')} ({what}) ==="]
    if kind == "bundle":
        lines += bundle_lines(info)
    elif kind == "model":
        lines += _model_lines(info)
    onnx_info = info.get("onnx") if kind == "bundle" else info if kind == "onnx" else None
    if onnx_info:
        lines += _onnx_lines(onnx_info, io=kind == "onnx")
    elif info.get("onnx_note"):
        lines += labelled("ONNX ops", [info["onnx_note"]])
    engine = info.get("engine")
    if engine:
        lines += _engine_lines(engine, layers)
    gates = (info.get("gates") or {}).get("gates", [])
    if gates:
        rows = [(gate_label(g), g.get("kind", ""), g.get("module", ""),
                 ", ".join(f"{k}={_detail(v)}" for k, v in (g.get("details") or {}).items())) for g in gates]
        lines += ["", *table(("gate", "kind", "module", "details"), rows)]
    elif kind in ("bundle", "model"):
        lines += labelled("Gates", ["none found"])
    if engine and layers:
        lines += ["", *_layer_table(engine)]
    return "\n".join(lines)


def _model_lines(info: Mapping[str, Any]) -> list[str]:
    params = info.get("parameters")
    lines = labelled("Model", [f"{str(info.get('class') or '?').rpartition(':')[2]} ({info.get('format')}), "
                               f"{f'{params:,}' if isinstance(params, int) else '?'} parameters, "
                               f"sha256 {str(info.get('sha256'))[:12]}..."])
    if info.get("architecture"):
        lines += labelled("Architecture", [str(info["architecture"])])
    converters = info.get("converters")
    if converters is not None:  # what export would replace; the gates below are found after it
        lines += labelled("Converters", [_converter_line(c) for c in converters] or ["none apply"])
    if info.get("unrecognised"):
        lines += labelled("No converter", [f"{', '.join(info['unrecognised'])}: MoE-like, export as plain ops"])
    meta = info.get("meta") or {}
    if meta.get("inputs"):
        lines += labelled("Inputs", [", ".join(f"{i.get('name')} {i.get('dtype')} {i.get('shape')}"
                                               for i in meta["inputs"])])
    if meta.get("dataset"):
        lines += labelled("Trained on", [str(meta["dataset"])])
    metrics = meta.get("metrics") or {}
    if metrics:
        lines += labelled("Metrics", pack(f"{k} {_detail(v)}" for k, v in metrics.items()))
    return lines


def _converter_line(c: Mapping[str, Any]) -> str:
    family = f" ({c['family']})" if c.get("family") else ""
    source, target = (str(c.get(k, "?")).rpartition(":")[2] for k in ("source_class", "target_class"))
    return f"{c.get('modules')} x {source} -> {target}{family}, first {c.get('first') or '<model>'}"


def _onnx_lines(o: Mapping[str, Any], *, io: bool) -> list[str]:
    lines: list[str] = []
    if io:
        def show(values: list[dict]) -> str:
            return ", ".join(f"{v['name']} {v['elem_type'].lower()} {v['shape']}" for v in values) or "-"

        lines += labelled("Inputs", [show(o.get("inputs") or [])]) + labelled("Outputs", [show(o.get("outputs") or [])])
        opsets = ", ".join(f"{k} {v}" for k, v in (o.get("opsets") or {}).items())
        lines += labelled("Opsets", [opsets + f"; functions {', '.join(o.get('functions') or []) or '-'}"])
    counts = o.get("op_counts") or {}
    # edgegate's own ops first (they are the point of the graph), then by count.
    order = sorted(counts.items(), key=lambda kv: (not kv[0].startswith("edgegate::"), -kv[1], kv[0]))
    head = f"{o.get('nodes', sum(counts.values()))} nodes, subgraphs included"
    return lines + labelled("ONNX ops", [head, *pack(f"{op} {n}" for op, n in order)])


def _engine_lines(engine: Mapping[str, Any], layers: bool) -> list[str]:
    caps = ", ".join(engine.get("compute_capabilities") or []) or "-"
    n = len(engine.get("layers") or [])
    text = (f"{engine.get('flavor')} {engine.get('trt_version') or ''}".strip()
            + f", compute capability {caps}, {n} layers from {engine.get('source')}")
    precisions = engine.get("layer_precisions") or {}
    out = labelled("Engine", [text])
    if precisions:
        out += labelled("Layer types", pack(f"{k} {v}" for k, v in sorted(precisions.items(), key=lambda kv: -kv[1])))
    if not layers and n:
        out += labelled("Layers", ["edgegate inspect --layers lists them"])
    return out


def _layer_table(engine: Mapping[str, Any]) -> list[str]:
    rows = []
    for layer in engine.get("layers") or []:  # the network listing's keys, else the engine inspector's
        name, kind = layer.get("name", layer.get("Name", "")), layer.get("type", layer.get("LayerType", ""))
        precision = ", ".join(layer.get("outputs", [])) or str(layer.get("Outputs", ""))
        rows.append((name, kind, precision))
    return table(("layer", "type", "outputs"), rows)


def _detail(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_detail(x) for x in v) + "]"
    return num(v)
