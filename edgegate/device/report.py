"""Reading a bench report back: the ``edgegate.bench`` JSON an agent sent -> a `BenchReport`.

Input: the decoded JSON (``BenchReport.to_dict``'s form) and, when asked for, every timed run's latency.
Output: the `BenchReport`, so a report measured on a device prints and saves exactly as a local one. A
reader refuses a format or version it does not know (README, "Report formats"), and since anyone who
answers at the agent's URL can send anything, every field the text rendering formats is type-checked:
a malformed report is a `BenchError`, never a traceback in the client.

Runtime side: the standard library + numpy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from edgegate.benchmark import (
    FORMAT,
    FORMAT_VERSION,
    BenchError,
    BenchReport,
    GoldenCheck,
    Histogram,
    LatencyStats,
    MemoryStats,
)
from edgegate.errors import one_line

NONE = type(None)


def read_bench_report(d: Any, latencies_ms: Sequence[float] = ()) -> BenchReport:
    """The `BenchReport` that `to_dict` wrote as `d`; BenchError unless it is one this edgegate reads."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        shown = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise BenchError(f"not an {FORMAT} report (format {str(shown)[:40]!r})")
    if d.get("version") != FORMAT_VERSION:
        raise BenchError(f"{FORMAT} report version {str(d.get('version'))[:20]} is not the one this edgegate "
                         f"reads ({FORMAT_VERSION}); use the same edgegate version on both sides")
    try:
        f = {k: d[k] for k in BenchReport.__dataclass_fields__ if k != "latencies_ms"}
        _expect(f, int, "batch", "warmup", "runs", "seed")
        _expect(f, (int, NONE), "requested_runs")
        _expect(f, float, "throughput", "timed_s")
        _expect(f, str, "bundle", "target")
        _expect(f, dict, "target_options", "host", "golden", "latency", "memory", "notes")
        _expect(f, (dict, NONE), "runtime_metrics", "device", "exits", "budget")
        _expect(f["latency"], float, *LatencyStats.__dataclass_fields__)
        _expect(f["memory"], (float, NONE), *MemoryStats.__dataclass_fields__)
        _expect(f["golden"], int, "samples")
        _expect(f["golden"], float, "atol")
        _expect(f["golden"], dict, "max_abs_err")
        _expect(f["golden"]["max_abs_err"], float, *f["golden"]["max_abs_err"])
        if f["budget"] is not None:
            _expect(f["budget"], float, "min_runs", "min_seconds", "max_seconds")
        if not isinstance(f["unstable"], bool) or not all(isinstance(w, str) for w in f["warnings"]):
            raise TypeError("unstable or warnings")
        return BenchReport(**{
            **f,
            "golden": GoldenCheck(**f["golden"]),
            "latency": LatencyStats(**f["latency"]),
            "memory": MemoryStats(**f["memory"]),
            "exits": None if f["exits"] is None else _histogram(f["exits"]),
            "routes": tuple(_histogram(h) for h in f["routes"]),
            "learners": tuple(_histogram(h) for h in f["learners"]),
            "warnings": tuple(f["warnings"]),
            "latencies_ms": tuple(float(v) for v in latencies_ms),
        })
    except (KeyError, TypeError, ValueError) as e:
        raise BenchError(f"malformed {FORMAT} report ({type(e).__name__}: {one_line(e, 80)})") from e


def _expect(d: Mapping[str, Any], kind: type | tuple[type, ...], *keys: str) -> None:
    """`d[key]` is a `kind` for every key (an int passes as a float, a bool never as a number)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds:
        kinds = (*kinds, int)
    for key in keys:
        v = d[key]
        if not isinstance(v, kinds) or isinstance(v, bool) and bool not in kinds:
            raise TypeError(f"{key} is {type(v).__name__}")


def _histogram(h: Any) -> Histogram:
    _expect(h, (str, NONE), "kind", "output")
    _expect(h, (float, NONE), "mean")
    return Histogram(**{**h, "counts": tuple(int(c) for c in h["counts"]),
                        "fractions": tuple(float(x) for x in h["fractions"])})
