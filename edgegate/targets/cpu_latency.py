"""Latency-aware INT8 for the ``cpu`` target: keep a region quantized only where it runs faster here.

Stage: targets (cpu compile). Input: a QDQ ``onnx.ModelProto``, representative inputs and the session
options the bundle will run with. Output: the model with the regions that ran slower in INT8 turned back
to float (``edgegate.onnx_export.passes.float_regions``), and one decision record per region.

Like NVIDIA ModelOpt's Q/DQ autotuning, a region keeps its Q/DQ only when ONNX Runtime on this CPU runs it
at least ``MIN_SPEEDUP`` (1.02x) faster than in float. Each region's two times come from ONNX Runtime's
per-node profile of the all-INT8 and the all-float graph (``all_float``), run interleaved, each node's
fastest run (the one another process disturbed least), summed over the region's nodes (an INT8 region's
unfused QuantizeLinear / DequantizeLinear included), at every measured batch size (1, and 8 when the batch
is dynamic); a region stays INT8 only if it wins at each. (Whole-graph trials one region at a time would
put a region's gain at a few percent of the measured time, below the noise of a loaded machine.) ORT may
fuse nodes of neighbouring regions into one (a float Conv with the Relu after it): a region its profile
shows no time for is decided together with the next. A final whole-graph trial (interleaved medians of each repeat's
fastest call) times the decided graph against the all-float one (and the all-INT8 one when they differ):
of the graphs at least as fast as all-float at every batch the fastest ships (the decided one on a tie), else
all-float, so the bundle is never slower than its FP32 form as measured here. Each region record's
``kept`` is what ships (its profile's verdict in ``profiled`` when the whole-graph trial overrode it).

A sparse MoE block of an int8 graph (``If(tokens <= 8: QMoE, else int8 gather/scatter)``, written by
``lower_moe``) lives in subgraphs, outside the regions: its else-branch is tried first, int8 against float, at
``MOE_BATCH`` rows (more tokens than the ``QMoE`` limit, so the branch runs), by the same rule; the
``QMoE`` branch is kept (``sparse_moe`` in the record). The final all-float trial leaves these blocks as decided.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgegate.fs import scratch_write
from edgegate.onnx_export.passes._graph import value_producers, value_readers
from edgegate.onnx_export.passes.float_regions import (
    all_float,
    integer_layers,
    regions,
    sparse_moe_switches,
    switch_branch_to_float,
    to_float,
    with_node_names,
)
from edgegate.targets.cpu import GRAPH_OPTIMIZATION

log = logging.getLogger(__name__)

MIN_SPEEDUP = 1.02
REPEATS = 7
REPEAT_MS = 15.0  # calls per repeat: about this long, at most MAX_CALLS
MAX_CALLS = 20
LARGE_BATCH = 8
PROFILE_MS = 600.0  # profiled runs: about this long per batch size, within PROFILE_RUNS
PROFILE_RUNS = (12, 60)
MOE_BATCH = 32  # rows for the sparse MoE trial: above lower_moe's QMoE token limit (8)
# Distinct rows timed one at a time at batch 1: a conditional model's cost depends on the row (how far it runs
# before an exit, which experts it routes to), so batch-1 times are the mean over these rows, not one row's.
ROWS_AT_BATCH_1 = 8
Feeds = list[tuple[int, list[dict[str, np.ndarray]]]]  # (batch, the feeds timed at it, in turn)


class _Timer:
    """ONNX Runtime sessions with the bundle's options; interleaved medians of per-call wall time.

    Each trial model goes to a file in ``workdir`` and its session loads from the path: the proto and its bytes
    need not stay alive beside ORT's own copy of the weights (export peak memory), and a trial model that
    ships is read back from its file."""

    def __init__(self, options: Any, threads: int, feeds: Feeds, workdir: str) -> None:
        import onnxruntime as ort

        self.ort, self.options, self.threads, self.feeds, self.workdir = ort, options, threads, feeds, workdir

    def save(self, name: str, model: Any, spent: bool = False) -> str:
        """The file of ``model``; ``spent``: the caller drops the proto after, so its tensors go to a data file
        one at a time (the proto keeps only their locations) instead of through one bytes copy of the model."""
        path = str(Path(self.workdir) / f"{name}.onnx")
        with scratch_write(path):
            onnx.save_model(model, path, save_as_external_data=spent, location=f"{name}.data")
        return path

    def session(self, path: str) -> Any:
        return self.ort.InferenceSession(path, sess_options=self._options(), providers=["CPUExecutionProvider"])

    def _options(self) -> Any:

        so = self.ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = getattr(self.ort.GraphOptimizationLevel,
                                              GRAPH_OPTIMIZATION[self.options.graph_optimization])
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return so

    @staticmethod
    def _round(sessions: dict[str, Any], feeds: list[dict[str, np.ndarray]]) -> float:
        """Every session on every feed once, in turn; the wall time in ms."""
        t0 = time.perf_counter()
        for s in sessions.values():
            for feed in feeds:
                s.run(None, feed)
        return (time.perf_counter() - t0) * 1e3

    def compare(self, sessions: dict[str, Any]) -> dict[int, dict[str, float]]:
        """{batch: {name: median ms}}: per repeat, each feed's least-disturbed call, averaged over the feeds
        of that batch size; the median over repeats."""
        out = {}
        for batch, feeds in self.feeds:
            self._round(sessions, feeds)  # warm-up
            per_session_ms = self._round(sessions, feeds) / len(sessions)  # one call of each feed
            calls = max(1, min(MAX_CALLS, int(REPEAT_MS / max(per_session_ms, 1e-3))))
            medians: dict[str, list[float]] = {k: [] for k in sessions}
            for _ in range(REPEATS):
                for k, s in sessions.items():
                    fastest = []
                    for feed in feeds:
                        times = []
                        for _ in range(calls):
                            t = time.perf_counter()
                            s.run(None, feed)
                            times.append(time.perf_counter() - t)
                        fastest.append(min(times))  # the least-disturbed call of the repeat
                    medians[k].append(statistics.fmean(fastest) * 1e3)
            out[batch] = {k: round(statistics.median(v), 5) for k, v in medians.items()}
        return out

    def profile(self, models: dict[str, str], feeds: list[dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
        """{name: {ORT node name: ms per call}}: interleaved profiled runs of the models (``models``: {name: file
        path}) over ``feeds`` in turn; each node's fastest time per feed, averaged over the feeds (``_per_call_ms``).

        The fastest of many runs is the time another process disturbed least: on a loaded machine a node of
        half a millisecond is preempted in some runs, never in all (medians of whole-graph times are not so
        robust when one region is a few percent of the graph)."""
        with tempfile.TemporaryDirectory() as tmp:
            sessions = {}
            for k, path in models.items():
                so = self._options()
                so.enable_profiling = True
                so.profile_file_prefix = str(Path(tmp) / k)
                sessions[k] = self.ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
            per_round_ms = self._round(sessions, feeds)
            runs = max(PROFILE_RUNS[0], min(PROFILE_RUNS[1], int(PROFILE_MS / max(per_round_ms, 1e-3))))
            for _ in range(runs):
                self._round(sessions, feeds)
            out = {k: _per_call_ms(json.loads(Path(s.end_profiling()).read_text()), len(feeds))
                   for k, s in sessions.items()}
        return out


def _per_call_ms(events: list[dict[str, Any]], n_feeds: int) -> dict[str, float]:
    """{ORT node name: ms per call} from one session's profile of calls cycling over ``n_feeds`` feeds: per
    node and feed, its fastest run (a node behind a gate that a feed's rows skip runs on no rows, in
    microseconds, or not at all: the fastest over all calls would be that one); the mean over the feeds."""
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    fastest: dict[str, dict[int, float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            call = max(0, bisect.bisect_right(starts, e["ts"]) - 1)  # the model_run it falls in
            by_feed = fastest.setdefault(e["name"][:-len("_kernel_time")], {})
            by_feed[call % n_feeds] = min(by_feed.get(call % n_feeds, float("inf")), e["dur"] / 1e3)
    return {node: sum(by_feed.values()) / n_feeds for node, by_feed in fastest.items()}


def _feeds(inputs: Mapping[str, np.ndarray], batches: list[int]) -> Feeds:
    """The feeds of every model input per timed batch size: ``ROWS_AT_BATCH_1`` distinct rows at batch 1 (as many
    as there are), one feed of the first rows (repeated when too few) at a larger batch."""
    out: Feeds = []
    for b in batches:
        if b == 1:
            rows = range(min(ROWS_AT_BATCH_1, min(len(x) for x in inputs.values())))
            feeds = [{name: np.ascontiguousarray(x[i:i + 1]) for name, x in inputs.items()} for i in rows]
        else:
            feeds = [{name: np.ascontiguousarray(x[:b] if len(x) >= b else np.resize(x, (b, *x.shape[1:])))
                      for name, x in inputs.items()}]
        out.append((b, feeds))
    return out


def keep_fast_regions(model, inputs: Mapping[str, np.ndarray], options: Any,
                      workdir: str | Path | None = None) -> tuple[Any, dict[str, Any]]:
    """(model with slow INT8 regions in float, the decision record for the manifest); ``workdir``: where the
    trial models are written (default: a temporary directory)."""
    with tempfile.TemporaryDirectory(prefix="edgegate-latency-", dir=workdir) as tmp:
        return _keep_fast_regions(model, inputs, options, tmp)


def _keep_fast_regions(model, inputs: Mapping[str, np.ndarray], options: Any, tmp: str) -> tuple[Any, dict[str, Any]]:
    model = with_node_names(model)
    graph_input = model.graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim
    static_batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
    threads = options.intra_op_threads or 1
    model, moe = _keep_fast_moe(model, _Timer(options, threads, _feeds(inputs, [static_batch or MOE_BATCH]), tmp))
    found = regions(model)
    if not found:
        return model, {"regions": [], "note": "no quantized region", **({"sparse_moe": moe} if moe else {})}
    timer = _Timer(options, threads, _feeds(inputs, [static_batch] if static_batch else [1, LARGE_BATCH]), tmp)
    start = time.perf_counter()
    int8_path, fp32_path = timer.save("int8", model), timer.save("float", all_float(model), spent=True)
    owner = _owners(model, found)
    per_batch = {}
    for batch, feeds in timer.feeds:
        node_ms = timer.profile({"int8": int8_path, "float": fp32_path}, feeds)
        per_batch[batch] = {k: _by_region(v, owner) for k, v in node_ms.items()}
    times = {name: {(b, k): r[k][0].get(name, 0.0) for b, r in per_batch.items() for k in r} for name, _ in found}
    decisions, slow = [], []
    for name, nodes, ms in _merge_unseen(found, times):
        int8_ms = {str(b): round(ms[b, "int8"], 5) for b in per_batch}
        float_ms = {str(b): round(ms[b, "float"], 5) for b in per_batch}
        speedups = {b: round(float_ms[b] / int8_ms[b], 4) if int8_ms[b] > 0 else None for b in int8_ms}
        # A region ORT's profile cannot see at all (every node fused away or renamed) stays as exported.
        keep = all(s is None or s >= MIN_SPEEDUP for s in speedups.values())
        decisions.append({"region": name, "nodes": len(nodes), "kept": "int8" if keep else "float",
                          "int8_ms": int8_ms, "float_ms": float_ms, "int8_speedup": speedups})
        if not keep:
            slow += nodes
    # Whole-graph trial: the profile times nodes alone; boundaries between float and INT8 regions (a
    # DequantizeLinear in, a QuantizeLinear out, layout reorders) cost extra, measured here.
    candidates = {"decided": timer.save("decided", to_float(model, slow), spent=True) if slow else int8_path,
                  "float": fp32_path}
    if slow:
        candidates["int8"] = int8_path
    times = timer.compare({k: timer.session(v) for k, v in candidates.items()})
    choice = _fastest(times)
    current = model if candidates[choice] == int8_path else onnx.load(candidates[choice])
    final = {k: {str(b): t[k] for b, t in times.items()} for k in candidates} | {"kept": choice}
    if choice != "decided":  # each region's ``kept`` says what ships (the golden check reads it)
        for d in decisions:
            d["profiled"], d["kept"] = d["kept"], choice
    kept = sum(d["kept"] == "int8" for d in decisions)
    log.info("latency-aware: %d of %d regions INT8 by profile, %s graph kept (%.1f s)", kept, len(decisions),
             choice, time.perf_counter() - start)
    record = {"method": "onnxruntime node profile (fastest of interleaved runs), then whole-graph trial",
              "min_speedup": MIN_SPEEDUP, "threads": threads,
              "batches": [b for b, _ in timer.feeds], "rows_timed": {str(b): len(f) for b, f in timer.feeds},
              "unattributed_ms": {str(b): {k: round(v[1], 5) for k, v in r.items()} for b, r in per_batch.items()},
              "seconds": round(time.perf_counter() - start, 2), "regions": decisions, "final": final}
    if moe:
        record["sparse_moe"] = moe
    return current, record


def _fastest(times: dict[int, dict[str, float]]) -> str:
    """The candidate to ship: of those at least as fast as all-float at every batch, the fastest (mean time
    relative to float over the batches; the decided graph on a tie), else all-float. The profile's per-region
    verdicts can be wrong (a region whose float nodes ORT renamed past recognition looks free in float): the
    whole-graph times decide."""
    names = [k for k in ("decided", "int8") if k in next(iter(times.values()))]
    fit = [k for k in names if all(t[k] <= t["float"] for t in times.values())]
    if not fit:
        return "float"
    return min(fit, key=lambda k: (statistics.fmean(t[k] / t["float"] for t in times.values()), names.index(k)))


def _owners(model, found: list[tuple[str, list[str]]]) -> dict[str, str]:
    """Region of each node name and output tensor name: its compute nodes, the QuantizeLinear of a tensor it
    writes and the activation DequantizeLinear it reads (their cost in INT8 is the region's)."""
    owner = {n: name for name, nodes in found for n in nodes}
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    producer, readers = value_producers(graph), value_readers(graph)
    for n in graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in producer and producer[n.input[0]].name in owner:
            owner.setdefault(n.name, owner[producer[n.input[0]].name])
        elif n.op_type == "DequantizeLinear" and n.input[0] not in inits:
            inside = [r.name for r in readers.get(n.output[0], []) if r.name in owner]
            q = producer.get(n.input[0])
            if inside:
                owner.setdefault(n.name, owner[inside[0]])
            elif q is not None and q.name in owner:  # read by no region (a graph output): its writer's
                owner.setdefault(n.name, owner[q.name])
    # ORT names a node it rewrote into its NCHWc layout after the node's output tensor.
    for n in graph.node:
        if n.name in owner:
            for o in n.output:
                owner.setdefault(o, owner[n.name])
    # A Linear lowered to integer matmuls is named PATH.<role>, and so are its float nodes in the all-float graph
    # (PATH.matmul_float, PATH.bias_float): the key "PATH." owns them (``_region_of`` tries dotted prefixes).
    for layer in integer_layers(graph):
        region = next((owner[n] for n in layer.nodes if n in owner), None)
        if region is not None:
            owner.setdefault(f"{layer.path}.", region)
    return owner


def _merge_unseen(found: list[tuple[str, list[str]]], times: dict[str, dict[Any, float]]
                  ) -> list[tuple[str, list[str], dict[Any, float]]]:
    """Regions with their summed times, a region without time on some side merged into the next one (the
    last into the one before): ORT fused its nodes into a neighbour's node, so they are decided together."""
    out: list[tuple[str, list[str], dict[Any, float]]] = []
    pending: tuple[str, list[str], dict[Any, float]] | None = None
    for name, nodes in found:
        ms = dict(times[name])
        if pending is not None:
            name, nodes = f"{pending[0].split('..')[0]}..{name.split('..')[-1]}", pending[1] + nodes
            ms = {k: v + pending[2][k] for k, v in ms.items()}
            pending = None
        if any(v <= 0 for v in ms.values()):
            pending = (name, nodes, ms)
        else:
            out.append((name, nodes, ms))
    if pending is not None:
        if out:
            name, nodes, ms = out.pop()
            pending = (f"{name.split('..')[0]}..{pending[0].split('..')[-1]}", nodes + pending[1],
                       {k: v + pending[2][k] for k, v in ms.items()})
        out.append(pending)
    return out


_ORT_SUFFIX = re.compile(r"(_token_\d+|_nchwc)$")
_ORT_FUSED = "fused "  # ORT's name of a node it fused with the next (Gemm + Relu): "fused <first node>"


def _region_of(name: str, owner: dict[str, str]) -> str | None:
    """The region owning ORT's node ``name``: ORT names a node it fused or rewrote after the node it replaced
    (or its output), with ``_token_N`` / ``_nchwc`` appended, ``fused `` prepended or ``/<Fusion>`` appended
    (``x.matmul_float/MatMulAddFusion``); a lowered layer's nodes are found by their dotted path prefix."""
    base = name.removeprefix(_ORT_FUSED)
    if base not in owner and "/" in base:
        base = base.rsplit("/", 1)[0]
    while base not in owner and _ORT_SUFFIX.search(base):
        base = _ORT_SUFFIX.sub("", base)
    if base in owner:
        return owner[base]
    parts = base.split(".")
    for i in range(len(parts) - 1, 0, -1):  # a lowered layer's node PATH.<role>: the key "PATH." (``_owners``)
        region = owner.get(".".join(parts[:i]) + ".")
        if region is not None:
            return region
    return None


def _by_region(node_ms: dict[str, float], owner: dict[str, str]) -> tuple[dict[str, float], float]:
    """({region: ms}, ms of nodes no region owns) from ORT's per-node times (names: ``_region_of``)."""
    out: dict[str, float] = {}
    rest = 0.0
    for name, ms in node_ms.items():
        region = _region_of(name, owner)
        if region is not None:
            out[region] = out.get(region, 0.0) + ms
        else:
            rest += ms
    return out, rest


def _keep_fast_moe(model, timer: _Timer) -> tuple[Any, list[dict[str, Any]]]:
    """Each sparse MoE block's int8 gather/scatter branch kept only where it runs faster than float (see the
    module doc); one record per block."""

    decisions = []
    current = None  # the file of ``model``
    for i, name in enumerate(sparse_moe_switches(model)):
        # One proto and two sessions at a time: the candidate lives in its file until it ships.
        float_path = timer.save(f"moe{i}_float", switch_branch_to_float(model, name), spent=True)
        current = current or timer.save(f"moe{i}_int8", model)
        times = timer.compare({"int8": timer.session(current), "float": timer.session(float_path)})
        speedups = {b: round(t["float"] / t["int8"], 4) for b, t in times.items()}
        keep = all(s >= MIN_SPEEDUP for s in speedups.values())
        decisions.append({"block": name, "qmoe_branch": "int8 (QMoE, not timed)",
                          "gather_scatter_branch": "int8" if keep else "float",
                          "int8_ms": {str(b): t["int8"] for b, t in times.items()},
                          "float_ms": {str(b): t["float"] for b, t in times.items()},
                          "int8_speedup": {str(b): s for b, s in speedups.items()}})
        if not keep:
            model, current = onnx.load(float_path), float_path
    return model, decisions
