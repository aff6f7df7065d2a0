"""The terminal form of a compare report: one table row per model variant, then skips and notes."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from edgegate.reports import text

if TYPE_CHECKING:
    from edgegate.comparison import CompareReport, Row

# The note (in the report's notes, so also in its JSON and HTML) naming the bundles whose recorded fidelity was
# measured on their calibration rows; the text repeats it under the table.
CALIBRATION_ROWS_NOTE = ("gate fidelity recorded at export on the calibration rows, not held-out data "
                         "(exported without --holdout)")

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


def _get(row: Row, col: tuple[str, str, str, str]) -> Any:
    source = row.metrics if col[1] == "m" else row.recorded
    return source.get(col[2])


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return spec.format(v)
