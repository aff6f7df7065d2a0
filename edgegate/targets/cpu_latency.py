"""Latency-aware INT8 for the ``cpu`` target: keep a region quantized only where it runs faster here.

Stage: targets (cpu compile). Input: a QDQ ``onnx.ModelProto``, representative inputs and the session
options the bundle will run with. Output: the model with the regions that ran slower in INT8 turned back
to float (``edgegate.onnx_export.passes.float_regions``), and one decision record per region.

Like NVIDIA ModelOpt's Q/DQ autotuning, a region keeps its Q/DQ only when ONNX Runtime on this CPU runs
the graph with it at least ``MIN_SPEEDUP`` (1.02x) faster than without it. Regions are tried one at a
time in graph order, each against the graph as decided so far (greedy); both candidates are timed in
the same loop, interleaved (each repeat's fastest call, which another process disturbed least; the median
over repeats), at every measured batch size (1, and 8 when the batch is
dynamic), and a region stays INT8 only if it wins at each. A final trial compares the result with the
all-float graph, so the bundle is never slower than its FP32 form as measured here. Trials are bounded:
at most ``MAX_REGIONS`` regions and a wall-time budget, after which untried regions stay INT8 and are
recorded as untried.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MIN_SPEEDUP = 1.02
REPEATS = 7
REPEAT_MS = 15.0  # calls per repeat: about this long, at most MAX_CALLS
MAX_CALLS = 20
BUDGET_S = 90.0
LARGE_BATCH = 8


class _Timer:
    """ONNX Runtime sessions with the bundle's options; interleaved medians of per-call wall time."""

    def __init__(self, options: Any, threads: int, feeds: list[dict[str, np.ndarray]]) -> None:
        import onnxruntime as ort

        self.ort, self.options, self.threads, self.feeds = ort, options, threads, feeds

    def session(self, model_bytes: bytes) -> Any:
        from edgegate.targets.cpu import GRAPH_OPTIMIZATION

        so = self.ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = getattr(self.ort.GraphOptimizationLevel,
                                              GRAPH_OPTIMIZATION[self.options.graph_optimization])
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return self.ort.InferenceSession(model_bytes, sess_options=so, providers=["CPUExecutionProvider"])

    def compare(self, sessions: dict[str, Any]) -> dict[int, dict[str, float]]:
        """{batch: {name: median ms}} for each feed's batch size."""
        out = {}
        for feed in self.feeds:
            batch = len(next(iter(feed.values())))
            for s in sessions.values():
                s.run(None, feed)
            t0 = time.perf_counter()
            for s in sessions.values():
                s.run(None, feed)
            per_call_ms = (time.perf_counter() - t0) * 1e3 / len(sessions)
            calls = max(1, min(MAX_CALLS, int(REPEAT_MS / max(per_call_ms, 1e-3))))
            medians: dict[str, list[float]] = {k: [] for k in sessions}
            for _ in range(REPEATS):
                for k, s in sessions.items():
                    times = []
                    for _ in range(calls):
                        t = time.perf_counter()
                        s.run(None, feed)
                        times.append(time.perf_counter() - t)
                    medians[k].append(min(times) * 1e3)  # the least-disturbed call of the repeat
            out[batch] = {k: round(statistics.median(v), 5) for k, v in medians.items()}
        return out


def _feeds(inputs: Mapping[str, np.ndarray], static_batch: int | None) -> list[dict[str, np.ndarray]]:
    batches = [static_batch] if static_batch else [1, LARGE_BATCH]
    out = []
    for b in batches:
        out.append({name: np.ascontiguousarray(x[:b] if len(x) >= b else np.resize(x, (b, *x.shape[1:])))
                    for name, x in ((n, np.asarray(v)) for n, v in inputs.items())})
    return out


def keep_fast_regions(model, inputs: np.ndarray | Mapping[str, np.ndarray],
                      options: Any) -> tuple[Any, dict[str, Any]]:
    """(model with slow INT8 regions in float, the decision record for the manifest). ``inputs``: rows of the
    first graph input, or of every input keyed by name (a model with several inputs)."""
    from edgegate.onnx_export.passes.float_regions import all_float, regions, to_float, with_node_names

    model = with_node_names(model)
    found = regions(model)
    if not found:
        return model, {"regions": [], "note": "no quantized region"}
    graph_input = model.graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim
    static_batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
    threads = options.intra_op_threads or 1
    feeds = inputs if isinstance(inputs, Mapping) else {graph_input.name: inputs}
    timer = _Timer(options, threads, _feeds(feeds, static_batch))
    start = time.perf_counter()
    current, current_bytes = model, model.SerializeToString()
    current_session = timer.session(current_bytes)
    decisions = []
    for name, nodes in found:
        if time.perf_counter() - start > BUDGET_S:
            decisions.append({"region": name, "nodes": len(nodes), "kept": "int8", "untried": "time budget spent"})
            continue
        candidate = to_float(current, nodes)
        candidate_bytes = candidate.SerializeToString()
        times = timer.compare({"int8": current_session, "float": timer.session(candidate_bytes)})
        speedups = {b: round(t["float"] / t["int8"], 4) for b, t in times.items()}
        keep = all(s >= MIN_SPEEDUP for s in speedups.values())
        decisions.append({"region": name, "nodes": len(nodes), "kept": "int8" if keep else "float",
                          "int8_ms": {str(b): t["int8"] for b, t in times.items()},
                          "float_ms": {str(b): t["float"] for b, t in times.items()},
                          "int8_speedup": {str(b): s for b, s in speedups.items()}})
        if not keep:
            current, current_bytes = candidate, candidate_bytes
            current_session = timer.session(current_bytes)
    fp32 = all_float(model)
    times = timer.compare({"int8": current_session, "float": timer.session(fp32.SerializeToString())})
    speedups = {b: round(t["float"] / t["int8"], 4) for b, t in times.items()}
    final = {"int8_ms": {str(b): t["int8"] for b, t in times.items()},
             "float_ms": {str(b): t["float"] for b, t in times.items()},
             "int8_speedup": {str(b): s for b, s in speedups.items()}}
    if not all(s >= 1.0 for s in speedups.values()):
        current = fp32
        final["kept"] = "float (the decided graph measured slower than all-float)"
    else:
        final["kept"] = "decided graph"
    kept = sum(d["kept"] == "int8" for d in decisions)
    log.info("latency-aware: %d of %d regions stay INT8 (%.1f s of trials)", kept, len(decisions),
             time.perf_counter() - start)
    record = {"min_speedup": MIN_SPEEDUP, "threads": threads, "batches": [len(next(iter(f.values())))
                                                                          for f in timer.feeds],
              "seconds": round(time.perf_counter() - start, 2), "regions": decisions, "final": final}
    return current, record
