"""The HTML form of a compare report: a table and PNG plots drawn with matplotlib (the ``report`` extra).

Output: ``report.html`` (the table, each agreement's rows and 95% interval, the notes) plus its images in
``<stem>_files/`` next to it (plain files, so the page opens offline and the images can be reused):
accuracy vs mean exit depth over the exit-threshold sweep
(float and each bundle, operating points starred), per-layer SQNR bars, latency distribution.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import TYPE_CHECKING

from edgegate.errors import EdgegateError
from edgegate.reports.compare_text import interval_lines, table

if TYPE_CHECKING:
    from edgegate.reports.compare_record import CompareReport

INF_SHOWN_DB = 100.0  # an identical layer (infinite SQNR) is drawn at this height


def write_html(report: CompareReport, path: str | Path) -> Path:
    """Write the page and its PNGs; returns the page's path."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise EdgegateError("compare --html needs matplotlib; pip install 'edgegate[report]'") from e
    path = Path(path)
    files = path.parent / f"{path.stem}_files"
    files.mkdir(parents=True, exist_ok=True)
    figures = []
    for name, caption, draw in (("accuracy_vs_depth.png", "Accuracy vs mean exit depth (threshold sweep)", _sweep),
                                ("layer_sqnr.png", "Per-layer SQNR vs float (dB)", _layers),
                                ("latency.png", "Latency distribution per run (ms)", _latency)):
        fig = draw(plt, report)
        if fig is None:
            continue
        fig.savefig(files / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        figures.append((f"{files.name}/{name}", caption))
    path.write_text(_page(report, figures), encoding="utf-8")
    return path


def _sweep(plt, report: CompareReport):
    rows = [r for r in report.rows if r.sweep and all("accuracy" in p for p in r.sweep)]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        line, = ax.plot([p["mean_exit_depth"] for p in r.sweep], [p["accuracy"] for p in r.sweep], marker="o",
                        markersize=3, label=r.name)
        if "accuracy" in r.metrics and "mean_exit_depth" in r.metrics:
            ax.plot(r.metrics["mean_exit_depth"], r.metrics["accuracy"], marker="*", markersize=14,
                    color=line.get_color(), linestyle="none")
    ax.set_xlabel("mean exit depth (stages run per sample)")
    ax.set_ylabel("accuracy")
    ax.set_title("exit-threshold sweep (star: deployed thresholds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _layers(plt, report: CompareReport):
    rows = [r for r in report.rows if r.layer_sqnr_db]
    if not rows:
        return None
    layers = list(dict.fromkeys(k for r in rows for k in r.layer_sqnr_db))  # graph order
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(layers) * len(rows) + 1.5))
    height = 0.8 / len(rows)
    for j, r in enumerate(rows):
        vals = [r.layer_sqnr_db.get(k, math.nan) for k in layers]
        vals = [INF_SHOWN_DB if math.isinf(v) and v > 0 else v for v in vals]
        ax.barh([i + j * height for i in range(len(layers))], vals, height=height, label=r.name)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(layers))], layers, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"SQNR dB (higher is better; identical drawn at {INF_SHOWN_DB:g})")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _latency(plt, report: CompareReport):
    rows = [r for r in report.rows if r.latencies_ms]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.5))
    import matplotlib

    major_minor = tuple(int(v) for v in matplotlib.__version__.split(".")[:2])
    horizontal = {"orientation": "horizontal"} if major_minor >= (3, 10) else {"vert": False}  # renamed in 3.10
    ax.boxplot([list(r.latencies_ms) for r in rows], whis=(1, 99), showfliers=True, **horizontal)
    ax.set_yticks(range(1, len(rows) + 1), [f"{r.name} (batch {r.batch})" for r in rows], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("ms per run (whiskers: p1 / p99)")
    return fig


def _page(report: CompareReport, figures: list[tuple[str, str]]) -> str:
    e = html.escape
    headers, cells = table(report)
    d, m = report.data, report.model
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>edgegate compare: {e(m['file'])}</title>",
           "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
           "img{max-width:100%;display:block;margin:1em 0}</style></head><body>",
           f"<h1>edgegate compare: {e(m['file'])}</h1>",
           f"<p>data: {e(str(d['name']))} ({e(str(d['split']))}, {d['samples']} samples); "
           f"model sha256 {e(str(m['sha256'])[:16])}…</p>",
           "<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
    out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in cells]
    out.append("</tbody></table>")
    intervals = interval_lines(report)
    if intervals:
        out.append(f"<p>{e(intervals[0])}</p><ul>")
        out += [f"<li>{e(line.strip())}</li>" for line in intervals[1:]]
        out.append("</ul>")
    out += [f"<p><b>{e(r.name)}</b>: {e(r.note)}</p>" for r in report.rows if r.status != "ok"]
    for src, caption in figures:
        out.append(f'<figure><img src="{e(src)}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>')
    out.append("<h2>How these numbers are measured</h2><ul>")
    out += [f"<li>{e(n)}</li>" for n in report.notes]
    out.append("</ul></body></html>")
    return "\n".join(out) + "\n"
