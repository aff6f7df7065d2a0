"""Per-layer SQNR of bundles vs the float model, for compare (definition in ``edgegate.comparison``).

Input: compare's rows, each probed bundle's ``model.onnx`` (with its static batch), the float torch
model, evaluation inputs (every model input) and the float outputs. Output: the rows with ``layer_sqnr_db``
filled: ``{torch module path: dB}``, scored on the rows that reach each layer under the float gating.
A lowered layer's output is picked among its candidate tensors (``onnx_probe.layer_outputs``) as the
one closest to the float module's output; the other candidates are partial results of that layer.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgegate.data import Inputs
from edgegate.metrics import sqnr_db
from edgegate.nn import MoE
from edgegate.onnx_export.torch_export import is_early_exit
from edgegate.reports.onnx_probe import NEVER_EXIT, ProbeError, layer_outputs, run_layers, with_thresholds


def add_layer_sqnr(rows: list[Any], probes: list[tuple[int, Any]], model: Any, x: Inputs,
                    float_out: dict[str, np.ndarray]) -> list[Any]:
    """Per-layer SQNR for each probed row (see the module doc for the definition)."""
    import torch

    plans = {}
    for i, (proto, static) in probes:
        if is_early_exit(model):
            proto = with_thresholds(proto, NEVER_EXIT)
        plans[i] = (proto, static, layer_outputs(proto))
    paths = sorted({p for *_, layers in plans.values() for p in layers})
    ref = copy.deepcopy(model).eval()
    if is_early_exit(ref):
        ref.set_thresholds([NEVER_EXIT] * len(ref.thresholds))
    for mod in ref.modules():
        if hasattr(mod, "dispatch"):
            mod.dispatch = "dense"  # every expert on every token, as in the exported graph
    acts: dict[str, list[np.ndarray]] = {p: [] for p in paths}
    modules = dict(ref.named_modules())
    handles = [modules[p].register_forward_hook(
        lambda mod, args, out, p=p: acts[p].append((out[0] if isinstance(out, tuple) else out).detach().numpy()))
        for p in paths if p in modules]
    try:
        with torch.no_grad():
            x.map(torch.from_numpy).run(ref)
    finally:
        for h in handles:
            h.remove()
    reach = rows_reaching(ref, paths, float_out.get("exit_index", np.zeros(0))[: len(x)])
    new = list(rows)
    for i, (proto, static, layers) in plans.items():
        try:
            got = run_layers(proto, dict(x.arrays), sorted({t for ts in layers.values() for t in ts}), static)
        except ProbeError as e:
            new[i] = dataclasses.replace(rows[i], note=f"no per-layer SQNR: {e}")
            continue
        sq = {}
        for path, tensors in layers.items():
            want = acts.get(path) or []
            if len(want) != 1:
                continue
            rows_in = reach.get(path)
            if rows_in is None or len(rows_in) != len(want[0]) or not rows_in.any():
                rows_in = np.ones(len(want[0]), dtype=bool)
            # The layer's output is the candidate that matches the float output: the others are partial
            # sums or scaled accumulators of a lowered layer, far off by construction.
            scores = [sqnr_db(want[0][rows_in], got[t][rows_in]) for t in tensors
                      if t in got and got[t].shape == want[0].shape and got[t].dtype.kind == "f"]
            # The sparse MoE form (cpu) runs an expert on its routed rows only, in token order.
            routed = want[0][rows_in]
            scores += [sqnr_db(routed, got[t]) for t in tensors if t in got and got[t].shape != want[0].shape
                       and got[t].shape == routed.shape and got[t].dtype.kind == "f"]
            if scores:
                sq[path] = max(scores)
        new[i] = dataclasses.replace(rows[i], layer_sqnr_db=sq)
    return new


def rows_reaching(ref: Any, paths: Sequence[str], exit_index: np.ndarray) -> dict[str, np.ndarray]:
    """Per layer path, the rows that reach it under the float model's deployed gating (path-conditional):
    samples whose float exit index is >= the layer's stage, tokens the float router sent to its expert.
    Layers of neither kind are measured on every row (no entry here)."""
    reach: dict[str, np.ndarray] = {}
    if is_early_exit(ref) and exit_index.size:
        for p in paths:
            m = re.match(r"^(?:stages|heads)\.(\d+)(?:\.|$)", p)
            if m:
                reach[p] = exit_index >= int(m[1])
    for moe_path, mod in ref.named_modules():
        if not isinstance(mod, MoE) or mod.last_decision is None:
            continue
        routed = mod.last_decision.numpy()  # [tokens, k] of the dense run above: the float routing
        prefix = f"{moe_path}.experts." if moe_path else "experts."
        for p in paths:
            if p.startswith(prefix):
                e = int(p[len(prefix):].split(".")[0])
                reach[p] = (routed == e).any(-1)
    return reach
