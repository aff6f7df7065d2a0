"""compare's sweep of accuracy vs MoE expert-skip rate (MoDES, ``export --moe-skip``).

Input: the manifest's ``moe_skip`` record (tau and alpha_l per router), evaluation inputs and labels, and
either the float model (torch: each router set to skip with the bundle's alpha_l and the swept tau) or
the bundle's ``model.onnx`` (every ``TopKGate`` node's ``skip_threshold`` attribute replaced, its weights
made a graph output, run by ONNX Runtime on the CPU). Output: points ``{tau, skip_rate, accuracy}``: one
tau for every router, at `TAU_FACTORS` times the deployed tau; skip rate = routed slots given weight 0 /
all routed slots; accuracy only with labels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import onnx
from onnx import helper

from edgegate.data import Inputs
from edgegate.nn import TopKRouter
from edgegate.onnx_export.passes._graph import copied
from edgegate.reports.onnx_probe import ProbeError, run_onnx

TAU_FACTORS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
GATE_OP = "TopKGate"
EVAL_BATCH = 256


def taus(skip: Mapping[str, Any]) -> list[float]:
    return [f * float(skip["tau"]) for f in TAU_FACTORS]


def _point(tau: float, logits: np.ndarray, weights: list[np.ndarray], labels: np.ndarray | None) -> dict[str, float]:
    total = sum(w.size for w in weights)
    point = {"tau": tau, "skip_rate": float(sum(int((w == 0).sum()) for w in weights) / total) if total else 0.0}
    if labels is not None and logits.ndim == 2:
        point["accuracy"] = float((logits.argmax(-1) == labels).mean())
    return point


@contextlib.contextmanager
def skipping(model: Any, skip: Mapping[str, Any], tau: float | None = None) -> Iterator[dict[str, Any]]:
    """``model``'s routers named in the manifest record ``skip`` set to skip with its alpha_l and ``tau``
    (default: its own), as deployed; restored on exit. Yields the routers by path."""

    found = {p: model.get_submodule(p) for p in skip.get("importance") or {}}
    found = {p: r for p, r in found.items() if isinstance(r, TopKRouter)}
    saved = {p: (r.skip_importance, r.skip_threshold) for p, r in found.items()}
    try:
        for p, r in found.items():
            r.set_skip(float(skip["importance"][p]), float(skip["tau"] if tau is None else tau))
        yield found
    finally:
        for p, r in found.items():
            r.set_skip(*saved[p])


def float_sweep(model: Any, x: Inputs, labels: np.ndarray | None, skip: Mapping[str, Any]) -> tuple[dict, ...]:
    """The float model (torch) skipping with the bundle's alpha_l at each swept tau."""
    import torch

    found = {p: model.get_submodule(p) for p in skip.get("importance") or {}}
    found = {p: r for p, r in found.items() if isinstance(r, TopKRouter)}
    if not found:
        return ()
    saved = {p: (r.skip_importance, r.skip_threshold) for p, r in found.items()}
    weights: list[np.ndarray] = []
    handles = [r.register_forward_hook(lambda m, a, out: weights.append(out[0][:, : m.k].detach().numpy()))
               for r in found.values()]
    points = []
    try:
        for tau in taus(skip):
            weights.clear()
            for p, r in found.items():
                r.set_skip(float(skip["importance"][p]), tau)
            outs = []
            with torch.no_grad():
                for i in range(0, len(x), EVAL_BATCH):
                    out = x[i:i + EVAL_BATCH].map(torch.from_numpy).run(model)
                    outs.append((out[0] if isinstance(out, tuple) else out).numpy())
            points.append(_point(tau, np.concatenate(outs), list(weights), labels))
    finally:
        for h in handles:
            h.remove()
        for p, r in found.items():
            r.set_skip(*saved[p])
    return tuple(points)


def with_skip_threshold(model: onnx.ModelProto, tau: float) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose main-graph ``TopKGate`` nodes skip at ``tau``, their weights graph outputs
    (returned by name)."""
    out = copied(model)
    gates = [n for n in out.graph.node if n.domain == "edgegate" and n.op_type == GATE_OP]
    if not gates:
        raise ProbeError("model.onnx has no edgegate TopKGate node in its main graph; no expert skipping to sweep")
    have = {o.name for o in out.graph.output}
    for node in gates:
        attrs = [a for a in node.attribute if a.name != "skip_threshold"]
        del node.attribute[:]
        node.attribute.extend([*attrs, helper.make_attribute("skip_threshold", float(tau))])
        if node.output[0] not in have:
            out.graph.output.append(helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
    return out, [n.output[0] for n in gates]


def bundle_sweep(model: onnx.ModelProto, x: Inputs, labels: np.ndarray | None, static: int | None,
                 skip: Mapping[str, Any]) -> tuple[dict, ...]:
    """The bundle's ``model.onnx`` on ONNX Runtime at each swept tau (its alpha_l are in its attributes)."""
    points = []
    for tau in taus(skip):
        probed, names = with_skip_threshold(model, tau)
        got = run_onnx(probed, dict(x.arrays), static)
        logits = got["logits"] if "logits" in got else got[model.graph.output[0].name]
        points.append(_point(tau, logits, [got[n] for n in names], labels))
    return tuple(points)
