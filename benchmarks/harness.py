"""Measurement harness shared by the benchmark sections: interleaved timing, goals, machine record.

Every figure is a *comparison*: the candidate and its peers are timed in the same process, in the
same repeat loop, round-robin (repeat r times A, then B, then C), so a burst of load from another
process hits all of them rather than one. A repeat is ``inner`` individually timed calls after
``warmup`` untimed ones; its value is the median time of its calls (a call that another process
preempted is an outlier, not a shift of the mean). The figure is the median over ``repeats``
(>= 5) repeats, and a ratio is the ratio of those medians. A "call" may itself be a pass over many
samples (the early-exit section), whose time is then the mean over that mix.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MIN_REPEATS = 5


class BenchmarkError(Exception):
    """A benchmark cannot run as asked (unknown section, missing peer library); one line for the CLI."""


@dataclass(frozen=True)
class Sizes:
    """How much to run: the smoke size (CI) or the full size (a user's run)."""

    smoke: bool
    repeats: int  # timed repeats per figure (median over them)
    inner: int  # calls per repeat (mean over them)
    warmup: int  # untimed calls before the first repeat

    @classmethod
    def for_run(cls, smoke: bool) -> Sizes:
        return cls(smoke=True, repeats=MIN_REPEATS, inner=5, warmup=2) if smoke else \
            cls(smoke=False, repeats=7, inner=50, warmup=10)

    def inner_for(self, seconds_per_call: float, budget_s: float = 0.25) -> int:
        """Calls per repeat: ``inner``, fewer for slow calls so one repeat stays near ``budget_s``."""
        return max(1, min(self.inner, int(budget_s / max(seconds_per_call, 1e-9))))


@dataclass(frozen=True)
class Timing:
    """Per-call wall time of one candidate: median over repeats of each repeat's median call, in ms."""

    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    inner: int

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def time_interleaved(candidates: Mapping[str, Callable[[], Any]], sizes: Sizes,
                     inner: int | None = None) -> dict[str, Timing]:
    """Time each zero-argument callable round-robin; the slowest call (after warm-up) sets ``inner``."""
    for fn in candidates.values():
        for _ in range(max(1, sizes.warmup)):
            fn()
    if inner is None:
        slowest = 0.0
        for fn in candidates.values():
            t0 = time.perf_counter()
            fn()
            slowest = max(slowest, time.perf_counter() - t0)
        inner = sizes.inner_for(slowest)
    per_repeat: dict[str, list[float]] = {k: [] for k in candidates}
    calls = [0.0] * inner
    for _ in range(max(MIN_REPEATS, sizes.repeats)):
        for name, fn in candidates.items():
            for i in range(inner):
                t0 = time.perf_counter()
                fn()
                calls[i] = time.perf_counter() - t0
            per_repeat[name].append(statistics.median(calls) * 1e3)
    return {k: Timing(statistics.median(v), min(v), max(v), len(v), inner) for k, v in per_repeat.items()}


def ratio(numerator: Timing | float, denominator: Timing | float) -> float | None:
    """``numerator / denominator`` of median times (a speed-up when the peer is the numerator)."""
    a = numerator.median_ms if isinstance(numerator, Timing) else numerator
    b = denominator.median_ms if isinstance(denominator, Timing) else denominator
    return round(a / b, 3) if b > 0 else None


def goal(name: str, target: str, value: float | None, met: bool | None, note: str = "") -> dict[str, Any]:
    """A goal of the issue, as measured: ``met`` is None when the figure could not be measured."""
    return {"goal": name, "target": target, "value": value, "met": met, "note": note}


def ort_session(source: bytes | str, threads: int) -> Any:
    """An ONNX Runtime CPU session as the ``cpu`` target builds one (all graph optimizations), no spinning."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # Peers are timed back to back on few cores: idle workers spinning after one session's call would
    # steal the cores from the next session's call, so worker threads block instead (both sides alike).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(source, sess_options=so, providers=["CPUExecutionProvider"])


def child_env() -> dict[str, str]:
    """This process's environment with the repository root first on PYTHONPATH: a ``python -c`` child imports
    ``benchmarks`` and ``edgegate`` from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.pathsep + \
        env.get("PYTHONPATH", "")
    return env


# Runs each model's session over the feeds and prints its name once every feed ran. A session that kills its
# process (an ONNX Runtime segfault) prints nothing more, which names it to the parent.
_PROBE = """
import sys
import numpy as np
from benchmarks.harness import ort_session
folder, threads, input_name, names = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
feeds = np.load(folder + "/feeds.npz")
for name in names:
    session = ort_session(folder + "/" + name + ".onnx", threads)
    for _ in range(2):
        for key in feeds.files:
            session.run(None, {input_name: feeds[key]})
    print(name, flush=True)
"""


def crashing(models: Mapping[str, bytes], threads: int, input_name: str, feeds: list[np.ndarray]) -> dict[str, str]:
    """``{name: why}`` for each of ``models`` whose ONNX Runtime session, built by :func:`ort_session` with
    ``threads``, kills its process on ``feeds``: each runs in a child first, so a crash inside ONNX Runtime is
    a row of the results instead of the end of the benchmark."""
    crashed: dict[str, str] = {}
    left = list(models)
    with tempfile.TemporaryDirectory(prefix="edgegate-probe-") as folder:
        np.savez(os.path.join(folder, "feeds.npz"), *feeds)
        for name, model in models.items():
            with open(os.path.join(folder, f"{name}.onnx"), "wb") as f:
                f.write(model)
        env = child_env()
        while left:
            proc = subprocess.run([sys.executable, "-c", _PROBE, folder, str(threads), input_name, *left],
                                  capture_output=True, text=True, env=env)
            done = proc.stdout.split()
            if proc.returncode == 0:
                break
            bad = left[len(done)]
            why = f"signal {-proc.returncode}" if proc.returncode < 0 else \
                (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:200]
            crashed[bad] = f"ONNX Runtime session died ({why}) at {threads} thread(s)"
            left = left[len(done) + 1:]
    return crashed


def sqnr_db(got: np.ndarray, want: np.ndarray) -> float:
    """SQNR of ``got`` against ``want`` in dB, rounded for the report; finite (a noise floor of 1e-30) for JSON."""
    noise = float(np.sum((got.astype(np.float64) - want) ** 2))
    return round(float(10 * np.log10(float(np.sum(want.astype(np.float64) ** 2)) / max(noise, 1e-30))), 2)


def output_quality(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    """A variant's outputs against the reference's: SQNR and top-1 (argmax of the last axis) agreement."""
    return {"sqnr_db": sqnr_db(got, want), "top1_agreement": round(float(np.mean(got.argmax(-1) == want.argmax(-1))),
                                                                    4)}


def batches(x: np.ndarray, batch: int, count: int = 16) -> list[np.ndarray]:
    """Up to ``count`` distinct consecutive batches of ``x`` (tiled when ``x`` is short)."""
    need = batch * count
    if len(x) < need:
        x = np.resize(x, (need, *x.shape[1:]))
    return [np.ascontiguousarray(x[i * batch:(i + 1) * batch]) for i in range(count)]


def cycling(run: Callable[[np.ndarray], Any], feeds: list[np.ndarray]) -> Callable[[], Any]:
    """A zero-argument callable that feeds the next of ``feeds`` on each call (gates see real variety)."""
    state = {"i": 0}

    def call() -> Any:
        i = state["i"]
        state["i"] = (i + 1) % len(feeds)
        return run(feeds[i])

    return call


_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
          "amx_int8", "amx_tile", "neon", "asimddp")


def machine_info() -> dict[str, Any]:
    """CPU model, the SIMD flags the int8/fp32 kernels pick from, cores, load, library versions."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for mod in ("edgegate", "numpy", "onnxruntime", "onnx", "torch", "snntorch"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "cpu_model": model,
        "cpu_flags": {f: f in flags for f in _FLAGS},
        "logical_cpus": os.cpu_count(),
        "cpus_usable": usable,
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "versions": versions,
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    try:
        import torch

        info["torch_threads_default"] = torch.get_num_threads()
    except ImportError:
        pass
    return info
