"""Gate fidelity: how faithfully the quantized model reproduces the float model's outputs and gates.

Stage: calibration report (DESIGN §5 "Gate fidelity"; shown by ``compare``). Input: the float and the
quantized model, held-out inputs (one array, or several keyed by input name) and labels. Output: a
JSON-able dict: accuracy and loss of both models, top-1 agreement, output SQNR, and per gate:
exit-index agreement (early exit), top-k set and top-1 expert agreement (routers), mask Hamming
distance (channel / threshold gates), mean absolute gate difference (sigmoid gates), learner-count
agreement (ACM); ``summary`` holds the worst value of each gate metric over gates. Each rate comes with
the rows it was counted over and its Wilson 95% interval (``intervals``, per gate and for the result):
exits and routes count samples / tokens, learner counts tokens; a mask's Hamming distance counts samples,
not bits, since the bits of one sample move together (the interval is then conservative).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgegate.calibration.inputs import Specs, as_inputs, as_labels, check_fits
from edgegate.data import NEXT_TOKEN_TASK, UNSCORED, Inputs, next_token_labels
from edgegate.gates import GateKind, GateMap, find_gates
from edgegate.metrics import (
    decision_agreement,
    mask_hamming,
    routed_rows,
    sqnr_db,
    top1_agreement,
    top1_expert_agreement,
    topk_set_agreement,
    wilson,
)

# Metric -> True when higher is better (for comparisons such as gate-aware vs naive calibration).
HIGHER_IS_BETTER = {
    "accuracy": True, "loss": False, "top1_agreement": True, "output_sqnr_db": True,
    "exit_agreement": True, "topk_set_agreement": True, "top1_expert_agreement": True,
    "mask_hamming": False, "gate_mae": False, "count_agreement": True,
}
_WORST = {True: min, False: max}
INTERVAL_METRICS = ("exit_agreement", "topk_set_agreement", "top1_expert_agreement", "mask_hamming",
                    "count_agreement")
_OBSERVED = (GateKind.EXIT, GateKind.ROUTER, GateKind.CHANNEL, GateKind.THRESHOLD, GateKind.SIGMOID,
             GateKind.LEARNERS)


@contextlib.contextmanager
def _decisions(model: nn.Module, gate_map: GateMap) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Collect each gate's ``last_decision`` after each of its forwards (works across batches)."""
    got: dict[str, list[torch.Tensor]] = {g.name: [] for g in gate_map if g.kind in _OBSERVED}
    handles = []
    for name in got:
        def hook(module: nn.Module, args: tuple, out: object, _name: str = name) -> None:
            if getattr(module, "last_decision", None) is not None:
                got[_name].append(module.last_decision)
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def _run(model: nn.Module, x: Inputs, gate_map: GateMap,
         batch_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    outs = []
    with torch.no_grad(), _decisions(model, gate_map) as got:
        for i in range(0, len(x), batch_size):
            out = x[i: i + batch_size].run(model)
            outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs), {n: torch.cat(v) for n, v in got.items() if v}


def _gate_metrics(kind: GateKind, f: torch.Tensor, q: torch.Tensor, n_exits: int | None) -> dict[str, Any]:
    if f.shape != q.shape:  # e.g. a router inside a compacted stage: rows differ, nothing to align
        return {"kind": str(kind), "aligned": False}
    if kind == GateKind.EXIT:
        n = n_exits or int(max(f.max(), q.max())) + 1
        frac = {name: [float(v) for v in torch.bincount(t, minlength=n).float() / len(t)]
                for name, t in (("float", f), ("quant", q))}
        out = {"kind": str(kind), "exit_agreement": decision_agreement(f.numpy(), q.numpy()), "exit_fractions": frac}
    elif kind == GateKind.ROUTER:
        out = {"kind": str(kind), "topk_set_agreement": topk_set_agreement(f.numpy(), q.numpy()),
               "top1_expert_agreement": top1_expert_agreement(f.numpy(), q.numpy())}
    elif kind == GateKind.LEARNERS:  # ACM: how many learners each token runs
        out = {"kind": str(kind), "count_agreement": decision_agreement(f.numpy(), q.numpy()),
               "mean_count": {"float": float(f.float().mean()), "quant": float(q.float().mean())}}
    elif kind == GateKind.SIGMOID:
        return {"kind": str(kind), "gate_mae": float((f.float() - q.float()).abs().mean()), "rows": len(f)}
    else:
        out = {"kind": str(kind), "mask_hamming": mask_hamming(f.numpy(), q.numpy()),
               "open_fraction": {"float": float(f.float().mean()), "quant": float(q.float().mean())}}
    # Decisions per row: one exit per sample, one route per token (leading dims), one learner count per token,
    # a mask per sample.
    rows = routed_rows(f.numpy()) if kind == GateKind.ROUTER else int(f.numel()) if kind == GateKind.LEARNERS \
        else len(f)
    out["rows"] = rows
    out["intervals"] = {m: wilson(out[m], rows).to_dict() for m in INTERVAL_METRICS if m in out}
    return out


def _numpy(t: Any) -> np.ndarray:
    return t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def measure_fidelity(float_model: nn.Module, quant_model: nn.Module, data: Any,
                     labels: np.ndarray | torch.Tensor | None = None,
                     gate_map: GateMap | None = None, *, input_spec: Specs = None,
                     batch_size: int | None = None) -> dict[str, Any]:
    """Float vs quantized on held-out ``data`` ([N, ...] per input, as `calibrate` takes it; ``labels``
    [N] class ids, optional). A causal LM (logits [N, T, V] of ``input_ids`` [N, T]) is scored on
    next-token prediction (``data.NEXT_TOKEN_TASK``; ``task`` and ``scored_tokens`` say so), the labels
    being the token after each window; agreement and SQNR are over every token.

    ``batch_size``: rows per forward (default: all at once). Both models run in eval mode with their
    own thresholds (the quantized model's re-tuned ones).
    """
    x = as_inputs(data, float_model, input_spec, source="evaluation data")
    y = as_labels(labels, len(x))
    float_model.eval(), quant_model.eval()
    check_fits(float_model, x, source="evaluation data")
    gate_map = find_gates(float_model) if gate_map is None else gate_map
    bs = batch_size or len(x)
    f_out, f_gates = _run(float_model, x, gate_map, bs)
    q_out, q_gates = _run(quant_model, x, gate_map, bs)
    result: dict[str, Any] = {
        "samples": len(x),
        "top1_agreement": top1_agreement(f_out.numpy(), q_out.numpy()),
        "output_sqnr_db": sqnr_db(f_out.numpy(), q_out.numpy()),
    }
    tokens = next_token_labels(x.map(_numpy).arrays, None if y is None else y.numpy(), tuple(f_out.shape))
    if tokens is not None:  # a causal LM: logits per token; labels, if any, are the token after the window
        y = torch.from_numpy(tokens)
        result["task"] = NEXT_TOKEN_TASK
        result["scored_tokens"] = int((y != UNSCORED).sum())
    if y is not None and y.dim() == f_out.dim() - 1 and bool((y != UNSCORED).any()):
        scored = y != UNSCORED
        result["accuracy"] = {"float": float((f_out.argmax(-1) == y)[scored].float().mean()),
                              "quant": float((q_out.argmax(-1) == y)[scored].float().mean())}
        result["loss"] = {"float": float(F.cross_entropy(f_out[scored].float(), y[scored])),
                          "quant": float(F.cross_entropy(q_out[scored].float(), y[scored]))}
    gates: dict[str, Any] = {}
    for info in gate_map:
        if info.name in f_gates and info.name in q_gates:
            gates[info.name] = _gate_metrics(info.kind, f_gates[info.name], q_gates[info.name],
                                             info.details.get("n_exits"))
        elif info.kind in _OBSERVED:  # a gate that records no decision is listed as unmeasured, not skipped
            gates[info.name] = {"kind": str(info.kind), "observed": False}
    result["gates"] = gates
    summary: dict[str, float] = {}
    # Rows behind each rate: one decision per sample, or per token for a causal LM's per-token logits.
    decisions = int(f_out.numel() // f_out.shape[-1])
    intervals = {"top1_agreement": wilson(result["top1_agreement"], decisions).to_dict()}
    if "accuracy" in result:
        intervals["accuracy"] = wilson(result["accuracy"]["quant"], result.get("scored_tokens", len(x))).to_dict()
    for metric, higher in HIGHER_IS_BETTER.items():
        values = [g for g in gates.values() if metric in g]
        if values:
            worst = _WORST[higher](values, key=lambda g: g[metric])
            summary[metric] = worst[metric]
            if metric in INTERVAL_METRICS:
                intervals[metric] = worst["intervals"][metric]
    result["summary"] = summary
    result["intervals"] = intervals
    return result


def comparable_metrics(fidelity: dict[str, Any]) -> dict[str, float]:
    """Flat ``{metric: value}`` of one fidelity result (quantized side), keys of HIGHER_IS_BETTER."""
    out = {k: fidelity[k] for k in ("top1_agreement", "output_sqnr_db") if k in fidelity}
    for k in ("accuracy", "loss"):
        if k in fidelity:
            out[k] = fidelity[k]["quant"]
    out.update(fidelity.get("summary", {}))
    return out


def at_least_as_good(a: dict[str, Any], b: dict[str, Any]) -> dict[str, bool]:
    """Per metric: is fidelity result ``a`` at least as good as ``b``?"""
    ma, mb = comparable_metrics(a), comparable_metrics(b)
    return {k: (ma[k] >= mb[k]) if HIGHER_IS_BETTER[k] else (ma[k] <= mb[k]) for k in ma if k in mb}
