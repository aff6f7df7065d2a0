"""Stage 8, bench: a bundle directory -> a `BenchReport` of on-device latency (DESIGN.md §9).

Input: a bundle written by ``edgegate export`` and a `BenchConfig`. Steps: read and verify the bundle
(sha256), load its target's runner, run ``golden_io.npz`` through it and compare with the recorded
outputs (a bundle that no longer reproduces its export is not worth timing), warm up, then time each
run. Output: a `BenchReport` with trtexec-style latency statistics, throughput, peak memory, host
info, for gated models exit/route/learner-count histograms (with routers' skipped-slot fraction), and
the runner's own ``metrics()`` when its target reports some (snn: spikes, synaptic ops, energy);
`BenchReport.to_dict` is the versioned JSON form (``"format": "edgegate.bench"``, README, "Report
formats") and `render_text` (``reports.bench_text``) the terminal block. Statistics and histograms live
in ``edgegate.reports.stats``.

Runtime side: numpy + onnxruntime (or the bundle target's runtime) only; torch and onnx are never
imported here, so ``edgegate bench`` runs on a device that has only the runtime installed.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edgegate import targets
from edgegate.bundle import read_bundle
from edgegate.reports.golden_check import GOLDEN_FILE, GoldenCheck, check_golden, read_golden, static_batch
from edgegate.reports.stats import (
    CV_WARN,
    EXIT_OUTPUT,
    MIN_RUNS,
    ROUTE_NOTE,
    THREAD_OPTIONS,
    BenchError,
    Histogram,
    LatencyStats,
    MemoryStats,
    gate_outputs,
    histogram,
    host_info,
    peak_rss_mib,
    plain,
    summarize_latencies,
)

__all__ = [
    "CV_WARN", "EXIT_OUTPUT", "FORMAT", "FORMAT_VERSION", "ROUTE_NOTE", "BenchConfig", "BenchError", "BenchReport",
    "GoldenCheck", "Histogram", "LatencyStats", "MemoryStats", "bench", "host_info",
    "summarize_latencies",
]

FORMAT = "edgegate.bench"
FORMAT_VERSION = 5  # v2 ``runtime_metrics``, v3 ``budget``/``notes``, v4 ``device``, v5 ``learners``/skips; README
DEFAULT_ATOL = 1e-4  # pipeline.py's tolerance, for bundles whose manifest records none
Arrays = dict[str, np.ndarray]
Progress = Callable[[int, "int | None"], None]  # (runs done, runs planned; None while a time budget decides)

# The default time budget. A sub-millisecond model timed for 200 runs is timed for ~10 ms: one scheduler
# hiccup moves its median, so by default the timed runs go on until both 200 runs and 1 s have passed
# (capped at 10 s for slow models), after a warm-up of at least 0.2 s (CPU clocks, caches, lazy init).
BUDGET_MIN_RUNS = 200
BUDGET_MIN_SECONDS = 1.0
BUDGET_MAX_SECONDS = 10.0
WARMUP_MIN_SECONDS = 0.2
WARMUP_MIN_RUNS = 2  # the first run may still initialize; the second shows the steady state
MAX_RUNS = 1_000_000  # bounds the memory of per-run latencies and gate outputs under a time budget


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to time. ``runs=None`` (default): a time budget decides, at least `min_runs` runs and
    `min_seconds` of timed runs, capped at `max_seconds` (default BUDGET_MAX_SECONDS). ``runs=N``: exactly
    N timed runs, capped only by an explicit `max_seconds`. ``warmup=None``: warm up for
    WARMUP_MIN_SECONDS (and at least WARMUP_MIN_RUNS runs)."""

    runs: int | None = None
    warmup: int | None = None
    threads: int | None = None  # None: as recorded in the bundle; 0: the runtime picks
    batch: int | None = None  # None: the bundle's static batch, or 1 when the batch is dynamic
    seed: int = 0  # order in which the golden samples are fed
    max_seconds: float | None = None  # stop the timed runs once they took this long (>= 1 run)
    min_seconds: float = BUDGET_MIN_SECONDS  # time budget only
    min_runs: int = BUDGET_MIN_RUNS  # time budget only

    def __post_init__(self) -> None:
        for name, low in (("runs", 1), ("warmup", 0), ("threads", 0), ("batch", 1), ("seed", 0), ("min_runs", 1)):
            v = getattr(self, name)
            if v is None and name in ("runs", "warmup", "threads", "batch"):
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise BenchError(f"bench {name}={v!r} must be an int >= {low}")
        for name in ("max_seconds", "min_seconds"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and 0 < v < math.inf):
                raise BenchError(f"bench {name}={v!r} must be a finite number of seconds > 0"
                                 + (" (or None for no cap)" if name == "max_seconds" else ""))

    @property
    def budget(self) -> dict[str, float] | None:
        """The time budget in force (None when `runs` fixes the count)."""
        if self.runs is not None:
            return None
        cap = BUDGET_MAX_SECONDS if self.max_seconds is None else self.max_seconds
        return {"min_runs": self.min_runs, "min_seconds": min(self.min_seconds, cap), "max_seconds": cap}


@dataclasses.dataclass(frozen=True)
class BenchReport:
    bundle: str
    target: str
    target_options: dict[str, Any]
    batch: int
    warmup: int  # warm-up runs done
    runs: int  # timed runs done (fewer than requested_runs when max_seconds stopped them)
    requested_runs: int | None  # None: the time budget decided
    seed: int
    golden: GoldenCheck
    latency: LatencyStats
    throughput: float  # samples/s = batch / mean latency
    timed_s: float  # wall time of the timed loop
    unstable: bool  # latency.cv > CV_WARN
    memory: MemoryStats
    host: dict[str, Any]
    exits: Histogram | None
    routes: tuple[Histogram, ...]
    warnings: tuple[str, ...]
    # ``runner.metrics()`` after the timed runs, for targets whose runner reports some (e.g. snn: spikes,
    # synaptic ops, timesteps, energy); None when the runner has no ``metrics``.
    runtime_metrics: dict[str, Any] | None = None
    # {min_runs, min_seconds, max_seconds} of the time budget that decided the runs; None with a fixed count.
    budget: dict[str, float] | None = None
    # What the target says about reading its lines, e.g. snn: {"exits": why every sample reports the last
    # exit, "runtime_metrics": that the metrics are of the last run} (the runner's ``bench_notes``).
    notes: dict[str, str] = dataclasses.field(default_factory=dict)
    # Which device agent measured the report (``{"name", "url"}``, edgegate.device); None: measured here.
    device: dict[str, Any] | None = None
    # Learner-count histograms of the model's ACMs (``kind="learners"``), one per ACM with a count output.
    learners: tuple[Histogram, ...] = ()
    # Every timed run's latency (only with ``bench(..., keep_latencies=True)``, for plots); not in the JSON.
    latencies_ms: tuple[float, ...] = dataclasses.field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists, not tuples), versioned so readers can refuse what they do not know."""
        d = plain(dataclasses.asdict(self))
        d.pop("latencies_ms")
        return {"format": FORMAT, "version": FORMAT_VERSION, **d}


# --------------------------------------------------------------------------------------------- bench


def bench(
    bundle_path: str | os.PathLike[str],
    config: BenchConfig | None = None,
    progress: Progress | None = None,
    *,
    keep_latencies: bool = False,
) -> BenchReport:
    """Check and time the bundle at `bundle_path`.

    `progress(done, total)` is called after every warm-up and timed run, total = warmup + runs (a
    `max_seconds` cap may end the runs before done reaches total); total is None while a time budget
    decides. `keep_latencies` keeps each run's time in ``BenchReport.latencies_ms`` (compare plots their
    distribution).
    """

    config = config or BenchConfig()
    bundle = read_bundle(bundle_path)  # verify=True: every file's sha256 before anything runs
    name, manifest = str(bundle.path), bundle.manifest
    target = targets.get(bundle.target)
    ok, why = targets.can_run(target)  # e.g. trt builds engines without a GPU but runs them only with one
    if not ok:
        raise BenchError(f"bundle {name} is for target {target.name}, which cannot run here: {why}")
    options = _target_options(target, bundle.target_options, config.threads, name)
    golden_in, golden_out = read_golden(bundle.file(GOLDEN_FILE), name)
    atol = float((manifest.get("golden") or {}).get("atol", DEFAULT_ATOL))

    rss_before = peak_rss_mib()
    # The target rebuilds its options from the manifest, so threads travel in a patched copy; the
    # files were verified above, and passing a Bundle (not a path) keeps load from reading them again.
    run_bundle = dataclasses.replace(bundle, manifest={**manifest, "target_options": options})
    with target.load(run_bundle) as runner:
        static = static_batch(manifest, runner)
        if static is not None and config.batch not in (None, static):
            raise BenchError(
                f"bundle {name} has a static batch of {static}; it cannot run batch {config.batch} "
                "(leave out --batch, or re-export with that --batch)"
            )
        batch = static or config.batch or 1
        golden = check_golden(runner, golden_in, golden_out, static, atol, name)
        gates = gate_outputs(manifest, runner.output_names)
        counted = {o for _, _, o in gates if o is not None}
        feeds = _feed_cycle(golden_in, batch, config.seed)
        warmup = _warm_up(runner, feeds, config, progress)
        timed = _time_runs(runner, feeds, config, warmup, counted, progress)
        metrics = runner.metrics()
        bench_notes = dict(runner.bench_notes or {})
    latencies_ns, seen, timed_s = timed
    rss_after = peak_rss_mib()

    per_run_ms = np.asarray(latencies_ns, dtype=np.float64) / 1e6
    latency = summarize_latencies(per_run_ms)
    runs = len(latencies_ns)
    budget = config.budget
    stopped = (f"stopped after {runs} of {config.runs} runs: max_seconds reached" if budget is None else
               f"stopped after {runs} runs (< {budget['min_runs']:g}): the {budget['max_seconds']:g} s cap was reached")
    notes = [
        (runs < (config.runs or 0) or budget is not None and runs < budget["min_runs"], stopped),
        (runs < MIN_RUNS, f"only {runs} timed runs (< {MIN_RUNS}): p95/p99 rest on one or two runs"),
        (latency.cv > CV_WARN, f"latency CV {latency.cv:.2f} > {CV_WARN}: noisy (other load? CPU scaling?)"),
    ]
    hists = [histogram(kind, g, o, seen.get(o) if o else None) for kind, g, o in gates]
    delta = None if rss_before is None or rss_after is None else round(rss_after - rss_before, 3)
    return BenchReport(
        bundle=name,
        target=target.name,
        target_options=options,
        batch=batch,
        warmup=warmup,
        runs=runs,
        requested_runs=config.runs,
        seed=config.seed,
        golden=golden,
        latency=latency,
        throughput=batch / (latency.mean_ms / 1e3) if latency.mean_ms > 0 else 0.0,
        timed_s=timed_s,
        unstable=latency.cv > CV_WARN,
        memory=MemoryStats(rss_before, rss_after, delta),
        host=host_info(),
        exits=next((h for h in hists if h.kind == "exit"), None),
        routes=tuple(h for h in hists if h.kind == "route"),
        learners=tuple(h for h in hists if h.kind == "learners"),
        warnings=tuple(text for flagged, text in notes if flagged),
        runtime_metrics=None if metrics is None else plain(dict(metrics)),
        budget=budget,
        notes={str(k): str(v) for k, v in bench_notes.items()},
        latencies_ms=tuple(per_run_ms.tolist()) if keep_latencies else (),
    )


def _warm_up(runner: Any, feeds: list[Arrays], config: BenchConfig, progress: Progress | None) -> int:
    """Untimed runs: `config.warmup` of them, or by default until WARMUP_MIN_SECONDS have passed."""
    total = None if config.runs is None else (config.warmup or 0) + config.runs
    done, start = 0, time.perf_counter()
    while (done < config.warmup if config.warmup is not None else
           done < WARMUP_MIN_RUNS or time.perf_counter() - start < WARMUP_MIN_SECONDS):
        runner.run(feeds[done % len(feeds)])
        done += 1
        if progress:
            progress(done, total)
    return done


def _time_runs(
    runner: Any, feeds: list[Arrays], config: BenchConfig, warmup: int, counted: set[str], progress: Progress | None
) -> tuple[list[int], dict[str, list[np.ndarray]], float]:
    """Time each `runner.run`, keeping the counted gate outputs. Returns ns per run, outputs, seconds.

    With a fixed count: `config.runs` runs (an explicit `max_seconds` may stop them early). Under a time
    budget: until at least `min_runs` runs and `min_seconds` have passed, or `max_seconds` has.
    """
    budget = config.budget
    runs = config.runs if budget is None else MAX_RUNS
    total = None if config.runs is None else warmup + config.runs
    cap_s = config.max_seconds if budget is None else budget["max_seconds"]
    latencies_ns: list[int] = []
    seen: dict[str, list[np.ndarray]] = {n: [] for n in counted}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collector pause is Python's latency, not the model's
    try:
        start = time.perf_counter_ns()
        deadline = None if cap_s is None else start + int(cap_s * 1e9)
        enough = None if budget is None else start + int(budget["min_seconds"] * 1e9)
        for i in range(runs):
            feed = feeds[i % len(feeds)]
            t0 = time.perf_counter_ns()
            out = runner.run(feed)
            t1 = time.perf_counter_ns()
            latencies_ns.append(t1 - t0)
            for n in counted:  # only the small gate outputs are kept, not the logits
                seen[n].append(out[n])
            if progress:
                progress(warmup + i + 1, total)
            if deadline is not None and t1 >= deadline:
                break
            if enough is not None and t1 >= enough and i + 1 >= budget["min_runs"]:
                break
        timed_s = (time.perf_counter_ns() - start) / 1e9
    finally:
        if gc_was_enabled:
            gc.enable()
    return latencies_ns, seen, timed_s


# ------------------------------------------------------------------------------------------- helpers


def _target_options(target: Any, recorded: dict[str, Any], threads: int | None, name: str) -> dict[str, Any]:
    if threads is None:
        return recorded
    fields = getattr(target.options_type, "__dataclass_fields__", {})  # options are frozen dataclasses
    key = next((k for k in THREAD_OPTIONS if k in fields), None)
    if key is None:
        raise BenchError(f"bundle {name}: target {target.name} takes no thread count; leave out --threads")
    return {**recorded, key: threads}


def _feed_cycle(inputs: Arrays, batch: int, seed: int) -> list[Arrays]:
    """Batches cut from the golden samples (shuffled by `seed`, wrapping round), built before timing.

    Real samples make gated models take realistic paths. After len(cycle) batches the sequence
    repeats, and every golden sample has then been fed equally often (lcm(n, batch) / n times).
    """
    n = next(iter(inputs.values())).shape[0]
    order = np.random.default_rng(seed).permutation(n)
    period = n // math.gcd(n, batch)
    return [
        {k: np.ascontiguousarray(v[order[(np.arange(batch) + j * batch) % n]]) for k, v in inputs.items()}
        for j in range(period)
    ]
