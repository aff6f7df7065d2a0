"""Section 2, early exit: measured mean latency vs the ideal sum_k p_k * cost_k of the exit histogram.

Per model, two exports of the same float network (``--quant fp32``: int8 export re-tunes the exit
thresholds, which would undo the forcing below):

* ``if``: ``--batch 1 --exit-form if`` (nested ONNX ``If``), fed the test samples one at a time;
* ``compaction``: dynamic batch (exited samples dropped before the next stage), fed batches of 64.

cost_k is measured, not modelled: for each exit k a copy of the *same* ONNX graph gets its exit
threshold constants replaced so that every sample leaves at k (threshold 0 at exit k: max prob >= 0
always holds; 2 before it: max prob >= 2 never does; all 2 for the last stage). One timed call is
a pass over the same samples (one by one, or all batches of 64), and the natural model and the K
forced copies are timed interleaved (``harness``). p_k is the natural model's exit histogram over
those samples, ideal = sum_k p_k * cost_k, and the goal is |measured / ideal - 1| <= 0.10. For batches
the ideal assumes a sample costs its share of a full batch; compaction pays its index/scatter
work and per-call overheads that do not shrink with the batch. "Full depth" is the forced last exit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.harness import Sizes, goal, ort_session, ratio, time_interleaved
from benchmarks.workspace import WIDE_EXIT, Workspace

FULL_MODELS = ("early_exit", WIDE_EXIT)
SMOKE_MODELS = ("early_exit",)
WITHIN = 0.10
NEVER, ALWAYS = 2.0, 0.0  # max softmax prob is in (0, 1]
DECISION_OPS = ("ExitDecision", "LearnedExitDecision")


def _exit_nodes(graph) -> list:
    """Exit decision nodes in stage order: depth-first, the later stages sit in ``If`` else-branches."""
    found = []
    for node in graph.node:
        if node.domain == "edgegate" and node.op_type in DECISION_OPS:
            found.append(node)
        for attr in node.attribute:
            for g in [*attr.graphs, *([attr.g] if attr.HasField("g") else [])]:
                found.extend(_exit_nodes(g))
    return found


def _initializers(graph) -> dict:
    out = {t.name: t for t in graph.initializer}
    for node in graph.node:
        for attr in node.attribute:
            for g in [*attr.graphs, *([attr.g] if attr.HasField("g") else [])]:
                out.update(_initializers(g))
    return out


def force_exit(model_bytes: bytes, exit_at: int) -> bytes:
    """The same graph with its exit thresholds set so that every sample leaves at exit ``exit_at``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(model_bytes)
    nodes, inits = _exit_nodes(model.graph), _initializers(model.graph)
    if exit_at > len(nodes):
        raise ValueError(f"the model has {len(nodes) + 1} exits; cannot force exit {exit_at}")
    for k, node in enumerate(nodes):
        name = node.input[1]
        if name not in inits:
            raise ValueError(f"exit {k}: threshold {name} is not a constant of the graph; cannot force it")
        value = ALWAYS if k == exit_at else NEVER
        inits[name].CopyFrom(numpy_helper.from_array(np.array(value, np.float32).reshape(inits[name].dims), name))
    return model.SerializeToString()


def _form(ws: Workspace, name: str, form: str, sizes: Sizes) -> dict[str, Any]:
    batch = 1 if form == "if" else 64
    export = ws.export(name, "fp32", batch=1 if form == "if" else None, exit_form="if" if form == "if" else "auto")
    _, test, input_name, dtype = ws.dataset(name)
    x = np.ascontiguousarray(test.input().astype(dtype))
    n = min(len(x), (64 if sizes.smoke else 256) if form == "if" else (128 if sizes.smoke else 512))
    feeds = [x[i:i + batch] for i in range(0, n - n % batch, batch)]
    natural = (export.path / "model.onnx").read_bytes()
    n_exits = len(_exit_nodes(__import__("onnx").load_from_string(natural).graph)) + 1
    models = {"measured": natural, **{f"exit_{k}": force_exit(natural, k) for k in range(n_exits)}}
    sessions = {k: ort_session(v, 1) for k, v in models.items()}
    exits = {k: np.concatenate([s.run(["exit_index"], {input_name: f})[0] for f in feeds]) for k, s in sessions.items()}
    for k in range(n_exits):  # the forcing is checked, not assumed
        if not np.all(exits[f"exit_{k}"] == k):
            raise RuntimeError(f"{name} {form}: forcing exit {k} did not make every sample exit there")
    p = np.bincount(exits["measured"], minlength=n_exits) / len(exits["measured"])

    def pass_over(session):
        return lambda: [session.run(None, {input_name: f}) for f in feeds]

    t = time_interleaved({k: pass_over(s) for k, s in sessions.items()}, sizes, inner=1)
    per_sample = {k: v.median_ms / (len(feeds) * batch) for k, v in t.items()}
    ideal = float(sum(p[k] * per_sample[f"exit_{k}"] for k in range(n_exits)))
    measured = per_sample["measured"]
    return {"form": form, "batch": batch, "samples": len(feeds) * batch,
            "exit_fractions": [round(float(v), 4) for v in p],
            "cost_ms_per_sample": [round(per_sample[f"exit_{k}"], 5) for k in range(n_exits)],
            "measured_ms_per_sample": round(measured, 5), "ideal_ms_per_sample": round(ideal, 5),
            "measured_over_ideal": ratio(measured, ideal),
            "full_depth_ms_per_sample": round(per_sample[f"exit_{n_exits - 1}"], 5),
            "speedup_vs_full_depth": ratio(per_sample[f"exit_{n_exits - 1}"], measured),
            "timings": {k: v.to_dict() for k, v in t.items()}}


def run(ws: Workspace, sizes: Sizes) -> dict[str, Any]:
    rows, errors, goals = [], [], []
    for name in SMOKE_MODELS if sizes.smoke else FULL_MODELS:
        for form in ("if", "compaction"):
            try:
                row = {"model": name, **_form(ws, name, form, sizes)}
            except Exception as e:
                errors.append({"model": name, "form": form,
                               "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"})
                continue
            rows.append(row)
            r = row["measured_over_ideal"]
            goals.append(goal(f"{name} {form} (batch {row['batch']}): within {WITHIN:.0%} of ideal",
                              f"abs(measured / ideal - 1) <= {WITHIN}", r, abs(r - 1) <= WITHIN,
                              f"{row['speedup_vs_full_depth']}x faster than full depth"))
    return {"method": __doc__.split("\n\n", 1)[1].strip(), "models": rows, "errors": errors, "goals": goals}
