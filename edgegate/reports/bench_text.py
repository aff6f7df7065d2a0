"""The terminal form of a bench report: a compact, trtexec-like block of plain text (no rich needed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from edgegate.reports.stats import THREAD_OPTIONS

if TYPE_CHECKING:
    from edgegate.benchmark import BenchReport

LIST_SHOWN = 8  # longer lists of runtime metrics are shown as their sum and length


def render_text(report: BenchReport) -> str:
    """The report as lines ``Label        : values``; warnings last."""
    r, lat, mem, h = report, report.latency, report.memory, report.host
    threads = next(
        (f"{v}" if v else "auto" for k, v in r.target_options.items() if k in THREAD_OPTIONS), "n/a"
    )
    errs = ", ".join(f"{k} {v:.3g}" for k, v in r.golden.max_abs_err.items())
    if r.budget:
        b = r.budget
        runs = (f"runs {r.runs} (time budget: >= {b['min_runs']:g} runs and >= {b['min_seconds']:g} s, "
                f"cap {b['max_seconds']:g} s)")
    else:
        runs = f"runs {r.runs}" + (f" of {r.requested_runs}" if r.runs != r.requested_runs else "")
    lines = [
        f"=== edgegate bench: {r.bundle} (target {r.target}) ===",
        f"Golden check : passed on {r.golden.samples} samples (max |err|: {errs}; atol {r.golden.atol:g})",
        f"Setup        : batch {r.batch}, warm-up {r.warmup} runs, {runs}, threads {threads}",
        f"Latency (ms) : min {lat.min_ms:.4f}  mean {lat.mean_ms:.4f}  median {lat.median_ms:.4f}  "
        f"p90 {lat.p90_ms:.4f}  p95 {lat.p95_ms:.4f}  p99 {lat.p99_ms:.4f}  max {lat.max_ms:.4f}",
        f"Spread       : std {lat.std_ms:.4f} ms, CV {lat.cv:.3f}" + ("  [UNSTABLE]" if r.unstable else ""),
        f"Throughput   : {r.throughput:.1f} samples/s (batch / mean latency); timed {r.timed_s:.3f} s",
    ]
    if r.device:  # measured by a device agent (`--device`)
        lines.insert(1, f"Device       : {r.device.get('name')} ({r.device.get('url')}), measured by its agent")
    if mem.peak_rss_after_mib is not None:
        lines.append(
            f"Peak RSS     : {mem.peak_rss_before_mib:.1f} MiB before load, "
            f"{mem.peak_rss_after_mib:.1f} MiB after runs (+{mem.delta_mib:.1f} MiB)"
        )
    for hist in (r.exits, *r.routes, *r.learners):
        if hist is None:
            continue
        pairs = zip(hist.counts, hist.fractions, strict=True)
        per = "  ".join(f"{i}: {c} ({f:.1%})" for i, (c, f) in enumerate(pairs))
        depth = "" if hist.mean is None else f"; mean {'depth' if hist.kind == 'exit' else 'learners'} {hist.mean:.2f}"
        if hist.skipped_fraction is not None:
            depth += f"; skipped slots {hist.skipped} ({hist.skipped_fraction:.1%} of routed)"
        label = {"exit": "Exits", "learners": f"Learners {hist.gate}"}.get(hist.kind, f"Routes {hist.gate}")
        counted = f" over {r.runs} timed runs" if hist.kind == "exit" else ""
        text = f"{per}{depth} [{hist.output}{counted}]" if hist.output else hist.note
        note = r.notes.get("exits") if hist.kind == "exit" else None
        lines.append(f"{label:<13}: {text}")
        if note:
            lines.append(f"{'':<13}: ({note})")
    if r.runtime_metrics:
        shown = metric_lines(r.runtime_metrics)
        if r.notes.get("runtime_metrics"):
            shown.insert(0, r.notes["runtime_metrics"] + ":")
        lines.extend(f"{'Runtime' if i == 0 else '':<13}: {text}" for i, text in enumerate(shown))
    lines.append(
        f"Host         : {h.get('cpus_usable')}/{h.get('cpu_count')} CPUs, {h.get('machine')}, "
        f"Python {h.get('python')}, onnxruntime {h.get('onnxruntime')} "
        f"[{', '.join(h.get('providers') or [])}]"
    )
    lines.extend(f"Warning      : {w}" for w in r.warnings)
    return "\n".join(lines)


def metric_lines(metrics: Mapping[str, Any], width: int = 100) -> list[str]:
    """``key value`` items of a runner's metrics (nested keys joined by '.'), packed into lines."""
    items = [f"{k} {_value(v)}" for k, v in _flatten(metrics)]
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + 2 + len(item) <= width:
            lines[-1] += ", " + item
        else:
            lines.append(item)
    return lines


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.extend(_flatten(v, key + ".") if isinstance(v, Mapping) else [(key, v)])
    return out


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and len(v) > LIST_SHOWN and all(isinstance(x, (int, float)) for x in v):
        return f"sum {sum(v):.4g} over {len(v)}"
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return str(v)
