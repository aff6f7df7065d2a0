"""The sweep's HTML report: ``sweep.json`` -> ``report.html`` + ``report_files/pareto_<n>.png`` (matplotlib).

Input: the ``edgegate.sweep`` dict. Output: per model (and evaluation data), one PNG with the Pareto
front of quality against latency: accuracy (or top-1 agreement when the data has no labels) and,
for gated models, the gate agreement the bundle's outputs show (exit index, top-k set), each vs the
median bench latency, marker area proportional to bundle size; then the table of every cell (the
same table `table` gives the terminal), front cells starred, errors with their reason.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgegate.reports.text import table as text_table
from edgegate.sweep.spec import CellStatus, SweepError
from edgegate.sweep.store import write_bytes

REPORT = "report.html"
GATE_AGREEMENTS = ("exit_agreement", "topk_set_agreement", "top1_expert_agreement")
HEADERS = ("#", "cell", "status", "accuracy", "vs float", "gate agr", "median ms", "p99 ms", "size KiB", "export s",
           "node", "cached", "front")


def check_report_deps() -> None:
    try:
        import matplotlib  # noqa: F401  (the `report` extra; checked before a sweep starts)
    except ImportError as e:
        raise SweepError("edgegate sweep writes report.html with matplotlib; pip install 'edgegate[report]'") from e


# --------------------------------------------------------------------------------------------- Pareto


def pareto_front(latency: Sequence[float], quality: Sequence[float]) -> list[bool]:
    """Which points no other point beats: one is beaten by another as fast or faster and as good or better,
    and strictly better in one of the two (lower latency, higher quality)."""
    points = list(zip(latency, quality, strict=True))
    return [not any(x2 <= x and y2 >= y and (x2 < x or y2 > y) for x2, y2 in points) for x, y in points]


def quality_metrics(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The quality axes for one model's rows: accuracy (else top-1 agreement), then a gate agreement if any."""
    has = [set((r.get("metrics") or {}).keys()) for r in rows]
    task = "accuracy" if all("accuracy" in h for h in has) else "top1_agreement"
    gate = [g for g in GATE_AGREEMENTS if all(g in h for h in has)]
    return [task, *gate[:1]]


def groups(sweep: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Rows by model file (a model's cells share their evaluation data): qualities compare within a group."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in sweep["rows"]:
        out.setdefault(r["cell"]["model"], []).append(r)
    return out


def _data_name(rows: Sequence[Mapping[str, Any]]) -> str:
    return next((str(r["data"]["name"]) for r in rows if r.get("data")), "-")


def front_keys(rows: Sequence[Mapping[str, Any]]) -> dict[str, set[str]]:
    """Per quality metric, the keys of the rows on its front (ok rows with a latency only)."""
    timed = [r for r in rows if r["status"] == CellStatus.OK and r.get("latency")]
    out: dict[str, set[str]] = {}
    if not timed:
        return out
    for metric in quality_metrics(timed):
        scored = [r for r in timed if (r.get("metrics") or {}).get(metric) is not None]
        on = pareto_front([r["latency"]["median_ms"] for r in scored], [r["metrics"][metric] for r in scored])
        out[metric] = {r["key"] for r, keep in zip(scored, on, strict=True) if keep}
    return out


# ---------------------------------------------------------------------------------------------- table


def table(sweep: Mapping[str, Any]) -> tuple[tuple[str, ...], list[list[str]]]:
    """(headers, one list of cells per row) for the terminal and the HTML page."""
    lines = []
    for rows in groups(sweep).values():
        fronts = front_keys(rows)
        for n, r in enumerate(rows, 1):
            m, ref, lat = r.get("metrics") or {}, r.get("reference") or {}, r.get("latency") or {}
            gate = next((m[g] for g in GATE_AGREEMENTS if g in m), None)
            acc = m.get("accuracy")
            delta = acc - ref["accuracy"] if acc is not None and ref.get("accuracy") is not None else None
            node = r.get("node") or {}
            starred = "*" * sum(r["key"] in keys for keys in fronts.values())
            status = f"error: {r.get('error')}" if r["status"] == CellStatus.ERROR else str(r["status"])
            size = None if r.get("bundle_bytes") is None else r["bundle_bytes"] / 1024
            lines.append([str(n), r["name"], status, _num(acc), _num(delta, "+.4f"), _num(gate),
                          _num(lat.get("median_ms")), _num(lat.get("p99_ms")), _num(size, ".1f"),
                          _num(r.get("export_s"), ".2f"), str(node.get("ip") or "-"),
                          "yes" if r.get("cached") else "no", starred or "-"])
    return HEADERS, lines


def render_text(sweep: Mapping[str, Any]) -> str:
    """The cell table as plain text (aligned columns, the same on a terminal and in a pipe)."""
    headers, lines = table(sweep)
    return "\n".join(text_table(headers, lines))


def _num(v: float | None, fmt: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


# ----------------------------------------------------------------------------------------------- HTML


def write_report(out: Path, sweep: Mapping[str, Any]) -> Path:
    """Write ``out/report.html`` and its PNGs (in ``out/report_files``); returns the page's path."""
    check_report_deps()
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    files = out / "report_files"
    files.mkdir(parents=True, exist_ok=True)
    figures = []
    for n, (model, rows) in enumerate(groups(sweep).items()):
        data = _data_name(rows)
        fig = _pareto_figure(plt, model, data, rows)
        if fig is None:
            continue
        name = f"pareto_{n}_{re.sub(r'[^A-Za-z0-9_.-]', '_', Path(model).stem)}.png"
        fig.savefig(files / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        figures.append((f"{files.name}/{name}", f"{model} on {data}: quality vs median latency (numbers: the "
                                                "table's #; marker area: bundle size; line: Pareto front)"))
    page = out / REPORT
    write_bytes(page, _page(sweep, figures).encode())
    return page


def _pareto_figure(plt: Any, model: str, data: str, rows: list[dict[str, Any]]) -> Any:
    timed = [r for r in rows if r["status"] == CellStatus.OK and r.get("latency")]
    if not timed:
        return None
    metrics = quality_metrics(timed)
    fronts = front_keys(rows)
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.8), squeeze=False)
    biggest = max(r.get("bundle_bytes") or 1 for r in timed)
    number = {id(r): n for n, r in enumerate(rows, 1)}  # as in `table`
    for ax, metric in zip(axes[0], metrics, strict=True):
        scored = [r for r in timed if (r.get("metrics") or {}).get(metric) is not None]
        for r in scored:
            on = r["key"] in fronts.get(metric, set())
            x, y = r["latency"]["median_ms"], r["metrics"][metric]
            ax.scatter([x], [y], s=30 + 400 * (r.get("bundle_bytes") or 0) / biggest, alpha=0.75 if on else 0.35,
                       color="tab:red" if on else "tab:blue", edgecolors="black", linewidths=0.5)
            # The cell's number in the table: names of near-equal cells would overprint each other.
            ax.annotate(str(number[id(r)]), (x, y), fontsize=8, xytext=(5, 5), textcoords="offset points")
        front = sorted((r["latency"]["median_ms"], r["metrics"][metric]) for r in scored
                       if r["key"] in fronts.get(metric, set()))
        if front:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:red", linewidth=1)
        ax.set_xlabel("median latency per run (ms, bench)")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(f"{model} ({data})", fontsize=9)
        ax.grid(alpha=0.3)
    return fig


def _page(sweep: Mapping[str, Any], figures: list[tuple[str, str]]) -> str:
    e = html.escape
    headers, lines = table(sweep)
    s, ray = sweep.get("summary") or {}, sweep.get("ray") or {}
    where = (f"Ray {ray.get('version')} at {ray.get('address')}, {ray.get('nodes')} node(s), {ray.get('cpus'):g} CPUs"
             if ray else "every cell came from the cache")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', "<title>edgegate sweep</title>",
           "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:nth-child(2),td:nth-child(3)"
           "{text-align:left}img{max-width:100%;display:block;margin:1em 0}</style></head><body>",
           "<h1>edgegate sweep</h1>",
           f"<p>{s.get('cells', 0)} cells: {s.get('ok', 0)} ok, {s.get('error', 0)} error, {s.get('pending', 0)} "
           f"pending, {s.get('cached', 0)} from the cache; wall {sweep.get('wall_s', 0):.1f} s; {e(where)}; "
           f"edgegate {e(str(sweep.get('edgegate')))}.</p>"]
    for src, caption in figures:
        out.append(f'<figure><img src="{e(src)}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>')
    out.append("<h2>Cells</h2><p>front: * per quality axis on which the cell is on the Pareto front (no other "
               "cell is as fast and as good); vs float: accuracy minus the float model's on the same data.</p>")
    out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr></thead><tbody>")
    out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in line) + "</tr>" for line in lines]
    out.append("</tbody></table></body></html>")
    return "\n".join(out) + "\n"
