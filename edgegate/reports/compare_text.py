"""The terminal form of a compare report: one table row per model variant, then each row's agreements with
their rows and 95% intervals (measured here and recorded at export), skips and notes."""

from __future__ import annotations

import math
from typing import Any

from edgegate.reports import text
from edgegate.reports.compare_record import CALIBRATION_ROWS_NOTE, CompareReport, Row

# (header, where the value lives, metric key, format): "m" = measured here, "r" = recorded at export.
COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("acc", "m", "accuracy", "{:.4f}"),
    ("loss", "m", "loss", "{:.4f}"),
    ("top1 agr", "m", "top1_agreement", "{:.4f}"),
    ("out SQNR dB", "m", "output_sqnr_db", "{:.1f}"),
    ("exit agr", "m", "exit_agreement", "{:.4f}"),
    ("depth", "m", "mean_exit_depth", "{:.3f}"),
    ("top-k set", "m", "topk_set_agreement", "{:.4f}"),
    ("top1 exp", "m", "top1_expert_agreement", "{:.4f}"),
    ("k agr", "m", "count_agreement", "{:.4f}"),
    ("mean k", "m", "mean_learners", "{:.3f}"),
    ("skipped", "m", "skip_rate", "{:.3f}"),
    ("mask Ham*", "r", "mask_hamming", "{:.4f}"),
)


def table(report: CompareReport) -> tuple[list[str], list[list[str]]]:
    """(headers, cells) shared by the terminal and the HTML renderings; only columns some row fills."""
    ok = [r for r in report.rows if r.status == "ok"]
    cols = [c for c in COLUMNS if any(_get(r, c) is not None for r in report.rows)]
    has_layers = any(r.layer_sqnr_db for r in ok)
    headers = ["model", "target", "quant", *[c[0] for c in cols]]
    headers += (["min layer SQNR dB"] if has_layers else []) + ["mean ms", "p99 ms"]
    cells = []
    for r in ok:
        row = [r.name, r.target or "-", r.quant or "-", *[_fmt(_get(r, c), c[3]) for c in cols]]
        if has_layers:
            worst = min(r.layer_sqnr_db.values()) if r.layer_sqnr_db else None
            row.append(_fmt(worst, "{:.1f}") + (f" ({min(r.layer_sqnr_db, key=r.layer_sqnr_db.get)})" if worst
                                               is not None else ""))
        row += [_fmt(r.latency.mean_ms if r.latency else None, "{:.4f}"),
                _fmt(r.latency.p99_ms if r.latency else None, "{:.4f}")]
        cells.append(row)
    return headers, cells


def render_text(report: CompareReport) -> str:
    """Plain-text table (columns padded), then skip lines and the method notes."""
    headers, cells = table(report)
    d = report.data
    lines = [f"=== edgegate compare: {report.model['file']} on {d['name']} ({d['split']}, {d['samples']} samples) ===",
             *text.table(headers, cells)]
    lines += interval_lines(report)
    lines += [f"{r.name}: {r.note}" for r in report.rows if r.status != "ok"]
    lines += [f"{r.name}: latency measured on device {r.device.get('name')} ({r.device.get('url')})"
              + (f"; {r.note}" if r.note else "") for r in report.rows if r.status == "ok" and r.device]
    if any(_get(r, c) is not None for r in report.rows for c in COLUMNS if c[1] == "r"):
        lines.append("* recorded at export on held-out data (manifest quant.fidelity)")
    lines += [n for n in report.notes if n.startswith(CALIBRATION_ROWS_NOTE)]
    swept = [r for r in report.rows if r.status == "ok" and r.skip_sweep]
    if swept:
        lines.append("skip sweep (tau: skipped slots, accuracy):")
        lines += [f"  {r.name}: " + "; ".join(f"{p['tau']:.3g}: {p['skip_rate']:.1%}" + (
            f", {p['accuracy']:.4f}" if "accuracy" in p else "") for p in r.skip_sweep) for r in swept]
    return "\n".join(lines)


# Rates shown with their interval, in table order: (metric key, header words).
INTERVALS = (("accuracy", "acc"), ("top1_agreement", "top1 agr"), ("exit_agreement", "exit agr"),
             ("topk_set_agreement", "top-k set"), ("top1_expert_agreement", "top1 exp"),
             ("mask_hamming", "mask Ham"), ("count_agreement", "k agr"))


def interval_lines(report: CompareReport) -> list[str]:
    """Per bundle row, one line: each rate measured here with its Wilson 95% interval and row count, then
    the gate fidelity recorded at export (held-out or calibration rows) the same way."""
    lines = []
    for r in report.rows:
        here = [_rate(words, r.intervals[key]) for key, words in INTERVALS if key in r.intervals]
        recorded = (r.recorded.get("intervals") or {}) if isinstance(r.recorded, dict) else {}
        kept = [_rate(words, recorded[key]) for key, words in INTERVALS if key in recorded]
        if not here and not kept:
            continue
        text = f"{r.name}: " + (f"measured here {', '.join(here)}" if here else "not measured here")
        if kept:
            where = "calibration" if r.recorded.get("measured_on") == "calibration" else "held-out"
            trained = r.recorded.get("trained_rows")
            text += (f"; recorded at export on {r.recorded.get('samples', '?')} {where} rows"
                     + (f" ({trained} of them trained on)" if trained else "") + f": {', '.join(kept)}")
        lines.append(text)
    return ["95% intervals (Wilson; rows counted):", *(f"  {line}" for line in lines)] if lines else []


def _rate(words: str, interval: dict[str, Any]) -> str:
    return (f"{words} {interval['value']:.4f} [{interval['low']:.4f}, {interval['high']:.4f}] "
            f"on {interval['rows']}")


def _get(row: Row, col: tuple[str, str, str, str]) -> Any:
    source = row.metrics if col[1] == "m" else row.recorded
    return source.get(col[2])


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return spec.format(v)
