"""Bench statistics: per-run latencies -> `LatencyStats`; gate outputs -> `Histogram`; host, memory.

Torch-free and onnx-free (numpy + the standard library), shared by ``bench`` and ``compare``.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgegate import __version__
from edgegate.errors import EdgegateError

EXIT_OUTPUT = "exit_index"
CV_WARN = 0.1  # above this the run-to-run spread is too large to compare two reports
MIN_RUNS = 30  # below this p95/p99 are set by one or two runs
# Option fields through which a target takes a thread count, in order of preference.
THREAD_OPTIONS = ("intra_op_threads", "threads", "num_threads")
ROUTE_NOTE = "route counts need a model output with the expert indices (named *route* or *indices*)"
LEARNER_NOTE = "learner counts need a model output with the ACM's per-token count (named *learner*)"


class BenchError(EdgegateError):
    """The bundle fails its golden check, or cannot be benchmarked with the given config."""


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Per-run wall time in ms; ``cv`` = population std / mean (coefficient of variation)."""

    min_ms: float
    mean_ms: float
    median_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    std_ms: float
    cv: float


@dataclasses.dataclass(frozen=True)
class MemoryStats:
    """Process peak RSS (``getrusage`` ru_maxrss: a high-water mark, not current use), in MiB.

    "before" is taken once the runtime is imported and the bundle verified, just before the model is
    loaded; "after" once the timed runs are done. The delta is how much loading the model and running
    it *raised* the peak: 0 when the process had peaked higher earlier (a test process that imported
    torch), so read it in a fresh process such as ``edgegate bench``. None where ``resource`` is
    missing (Windows).
    """

    peak_rss_before_mib: float | None
    peak_rss_after_mib: float | None
    delta_mib: float | None


@dataclasses.dataclass(frozen=True)
class Histogram:
    """Counts per exit (``kind="exit"``), per expert (``kind="route"``) or per learner count k
    (``kind="learners"``, an ACM: k = 0..N learners run per token) over the timed feeds.

    ``mean`` is the mean exit depth for exits (exit_index + 1: stages run), the mean learner count for
    learners, None for routes. ``skipped`` (routes): routed slots the router dropped (MoDES expert
    skipping; the route output marks them -1), not in ``counts``; ``skipped_fraction`` = skipped / all
    routed slots. When the model has no output to count, ``output`` is None, counts are empty and
    ``note`` says why.
    """

    kind: str
    gate: str | None
    output: str | None
    counts: tuple[int, ...]
    fractions: tuple[float, ...]
    mean: float | None = None
    note: str = ""
    skipped: int = 0
    skipped_fraction: float | None = None


def summarize_latencies(ms: Sequence[float] | np.ndarray) -> LatencyStats:
    """min/mean/median/p90/p95/p99/max (linear-interpolated percentiles), std and CV of `ms`."""
    a = np.asarray(ms, dtype=np.float64)
    if a.size == 0:
        raise BenchError("no latencies to summarize; run at least once")
    p50, p90, p95, p99 = (float(v) for v in np.percentile(a, [50, 90, 95, 99], method="linear"))
    mean, std = float(a.mean()), float(a.std())
    return LatencyStats(
        float(a.min()), mean, p50, p90, p95, p99, float(a.max()), std, std / mean if mean > 0 else 0.0
    )


def host_info() -> dict[str, Any]:
    """What the numbers depend on: CPUs (all, and usable by this process), machine, runtime versions."""

    try:
        import onnxruntime as ort

        ort_version, providers = ort.__version__, list(ort.get_available_providers())
    except ImportError:  # a device with another runtime (e.g. TensorRT only)
        ort_version, providers = None, []
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort_version,
        "providers": providers,
        "edgegate": __version__,
    }


def gate_outputs(manifest: Mapping[str, Any], outputs: Sequence[str]) -> list[tuple[str, dict, str | None]]:
    """(kind, manifest gate, output to count or None): the exit output, each router's indices and each
    ACM's learner counts."""
    gates = (manifest.get("gates") or {}).get("gates", [])
    exits = [g for g in gates if g.get("kind") == "exit"] or [{"name": None}]
    found = [("exit", exits[0], EXIT_OUTPUT)] if EXIT_OUTPUT in outputs else []
    routers = [g for g in gates if g.get("kind") == "router"]
    candidates = [o for o in outputs if "route" in o.lower() or o.lower().endswith("indices")]
    for g in routers:
        r = str(g.get("name") or "")
        named = [o for o in candidates if r and (r in o or r.replace(".", "_") in o)]
        if not named and len(routers) == 1 and len(candidates) == 1:
            named = candidates  # one router, one index output: they belong together
        found.append(("route", g, named[0] if named else None))
    acms = [g for g in gates if g.get("kind") == "learners"]
    counted = [o for o in outputs if "learner" in o.lower()]
    for g in acms:
        a = str(g.get("name") or "")
        named = [o for o in counted if a and (a in o or a.replace(".", "_") in o)]
        if not named and len(acms) == 1 and len(counted) == 1:
            named = counted
        found.append(("learners", g, named[0] if named else None))
    return found


def histogram(kind: str, gate: dict, output: str | None, seen: Sequence[np.ndarray] | None) -> Histogram:
    """Count the values of one gate output (exit ids, expert ids or learner counts) over the arrays in `seen`."""
    name = gate.get("name")
    if output is None or seen is None or not len(seen):
        # The gate's choice lives inside the graph: counting it needs an output, never a guess.
        return Histogram(kind, name, None, (), (), note=LEARNER_NOTE if kind == "learners" else ROUTE_NOTE)
    values = np.concatenate([np.asarray(v).reshape(-1) for v in seen]).astype(np.int64)
    skipped = int((values < 0).sum())
    values = values[values >= 0]  # a negative index marks a slot the router skipped: not a route
    details = gate.get("details") or {}
    size = {"exit": int(details.get("n_exits", 0)), "learners": int(details.get("n_learners", -1)) + 1}.get(
        kind, int(details.get("n_slots", details.get("n_experts", 0))))
    counts = np.bincount(values, minlength=size)
    total = max(int(counts.sum()), 1)
    mean = (float(values.mean()) + (1 if kind == "exit" else 0)) if kind != "route" and values.size else None
    fractions = tuple(float(c) / total for c in counts)
    routed = int(counts.sum()) + skipped
    return Histogram(kind, name, output, tuple(int(c) for c in counts), fractions, mean, skipped=skipped,
                     skipped_fraction=skipped / routed if kind == "route" and routed else None)


def peak_rss_mib() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 3)  # bytes on macOS, KiB on Linux


def plain(x: Any) -> Any:
    """JSON-ready: tuples -> lists, numpy scalars/arrays -> Python numbers/lists, non-finite -> None."""
    if isinstance(x, Mapping):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return plain(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None  # strict JSON has no NaN/Infinity
    return x
