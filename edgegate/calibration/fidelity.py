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
import math
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


class _Outputs:
    """What the output metrics need of both models' first outputs, batch by batch: argmax indices, SQNR
    sums, summed cross-entropy. Holding both models' whole outputs instead costs twice their size (512 MiB
    for a causal LM's logits of 512 x 16 tokens x 8 192 words, the peak of an int8 export)."""

    def __init__(self, x: Inputs, y: torch.Tensor | None) -> None:
        self.x, self.labels, self.y = x, y, y  # y: per-token targets once the first batch shows a causal LM
        self.task: bool | None = None
        self.shape: tuple[int, ...] = ()
        self.top1: dict[str, list[torch.Tensor]] = {"float": [], "quant": []}
        self.signal = self.noise = 0.0
        self.loss = {"float": 0.0, "quant": 0.0}

    def add(self, start: int, f: torch.Tensor, q: torch.Tensor) -> None:
        if self.task is None:  # the first batch: the outputs' shape decides whether labels are next tokens
            self.shape = (len(self.x), *f.shape[1:])
            tokens = next_token_labels(self.x.map(_numpy).arrays, None if self.labels is None
                                       else self.labels.numpy(), self.shape)
            self.task = tokens is not None
            if tokens is not None:
                self.y = torch.from_numpy(tokens)
        for name, out in (("float", f), ("quant", q)):
            self.top1[name].append(out.argmax(-1) if out.dim() > 1 else out)
        flat_f, flat_q = f.reshape(-1).numpy(), q.reshape(-1).numpy()
        for i in range(0, len(flat_f), _SLICE):  # float64 sums a slice at a time, as metrics.sqnr_db
            r, t = flat_f[i:i + _SLICE].astype(np.float64), flat_q[i:i + _SLICE].astype(np.float64)
            self.noise += float(np.square(r - t).sum())
            self.signal += float(np.square(r).sum())
        if self._scored():
            y = self.y[start:start + len(f)]
            scored = y != UNSCORED
            for name, out in (("float", f), ("quant", q)):
                self.loss[name] += float(F.cross_entropy(out[scored].float(), y[scored], reduction="sum"))

    def _scored(self) -> bool:
        return self.y is not None and self.y.dim() == len(self.shape) - 1 and bool((self.y != UNSCORED).any())

    def metrics(self) -> dict[str, Any]:
        f_top, q_top = (torch.cat(v) for v in self.top1.values())
        if len(self.shape) < 2:  # one value per sample: argmax over the whole output, as top1_agreement takes it
            f_top, q_top = f_top.argmax(-1), q_top.argmax(-1)
        result: dict[str, Any] = {
            "top1_agreement": float(np.mean(f_top.numpy() == q_top.numpy())),
            "output_sqnr_db": math.inf if self.noise == 0 else 10 * math.log10(self.signal / self.noise)
            if self.signal else -math.inf,
        }
        if self.task:  # a causal LM: logits per token; labels, if any, are the token after the window
            result["task"] = NEXT_TOKEN_TASK
            result["scored_tokens"] = int((self.y != UNSCORED).sum())
        if self._scored():
            scored = self.y != UNSCORED
            n = int(scored.sum())
            result["accuracy"] = {k: float((top == self.y)[scored].float().mean())
                                  for k, top in (("float", f_top), ("quant", q_top))}
            result["loss"] = {k: v / n for k, v in self.loss.items()}
        return result


_SLICE = 1 << 22


def _run(models: tuple[nn.Module, nn.Module], x: Inputs, y: torch.Tensor | None, gate_map: GateMap,
         batch_size: int) -> tuple[_Outputs, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Both models on each batch in turn: the output metrics' sums, each model's gate decisions."""
    acc = _Outputs(x, y)
    with torch.no_grad(), _decisions(models[0], gate_map) as f_got, _decisions(models[1], gate_map) as q_got:
        for i in range(0, len(x), batch_size):
            f, q = (x[i: i + batch_size].run(m) for m in models)
            acc.add(i, f[0] if isinstance(f, tuple) else f, q[0] if isinstance(q, tuple) else q)
    return acc, *({n: torch.cat(v) for n, v in got.items() if v} for got in (f_got, q_got))


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
    outputs, f_gates, q_gates = _run((float_model, quant_model), x, y, gate_map, bs)
    result: dict[str, Any] = {"samples": len(x), **outputs.metrics()}
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
    decisions = int(np.prod(outputs.shape[:-1]))
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
