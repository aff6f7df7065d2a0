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
from edgegate.calibration.kinds import gate_metrics, higher_is_better, measure_of, removing
from edgegate.data import NEXT_TOKEN_TASK, UNSCORED, Inputs, next_token_labels
from edgegate.gates import GateInfo, GateMap, find_gates
from edgegate.metrics import wilson

# Metric -> True when higher is better (for comparisons such as gate-aware vs naive calibration): the output
# metrics, then each built-in gate kind's (``calibration.kinds``; ``kinds.higher_is_better()`` adds user kinds').
HIGHER_IS_BETTER = higher_is_better()
_WORST = {True: min, False: max}
# Gate metrics that are rates over rows, reported with a Wilson interval (built-in kinds).
INTERVAL_METRICS = tuple(m.name for m in gate_metrics() if m.interval)


@contextlib.contextmanager
def _decisions(model: nn.Module, gate_map: GateMap) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Collect each observed gate's ``last_decision`` after each of its forwards (works across batches)."""
    got: dict[str, list[torch.Tensor]] = {g.name: [] for g in gate_map if measure_of(g.kind) is not None}

    def keep(module: nn.Module, name: str) -> None:
        if getattr(module, "last_decision", None) is not None:
            got[name].append(module.last_decision)

    with removing() as handles:
        handles += [model.get_submodule(n).register_forward_hook(lambda m, a, o, _n=n: keep(m, _n)) for n in got]
        yield got


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


def _gate_metrics(info: GateInfo, f: torch.Tensor, q: torch.Tensor) -> dict[str, Any]:
    if f.shape != q.shape:  # e.g. a router inside a compacted stage: rows differ, nothing to align
        return {"kind": str(info.kind), "aligned": False}
    spec = measure_of(info.kind)
    assert spec is not None  # only observed gates record decisions (_run)
    out = {"kind": str(info.kind), **spec.measure(f, q, info), "rows": spec.rows(f)}
    rates = [m.name for m in spec.metrics if m.interval]
    if rates:
        out["intervals"] = {m: wilson(out[m], out["rows"]).to_dict() for m in rates if m in out}
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
            gates[info.name] = _gate_metrics(info, f_gates[info.name], q_gates[info.name])
        elif measure_of(info.kind) is not None:  # a gate that records no decision is listed as unmeasured, not skipped
            gates[info.name] = {"kind": str(info.kind), "observed": False}
    result["gates"] = gates
    summary: dict[str, float] = {}
    # Rows behind each rate: one decision per sample, or per token for a causal LM's per-token logits.
    decisions = int(np.prod(outputs.shape[:-1]))
    intervals = {"top1_agreement": wilson(result["top1_agreement"], decisions).to_dict()}
    if "accuracy" in result:
        intervals["accuracy"] = wilson(result["accuracy"]["quant"], result.get("scored_tokens", len(x))).to_dict()
    for m in gate_metrics():
        values = [g for g in gates.values() if m.name in g]
        if values:
            metric = m.name
            worst = _WORST[m.higher_is_better](values, key=lambda g: g[metric])
            summary[metric] = worst[metric]
            if m.interval:
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
    higher = higher_is_better()
    return {k: (ma[k] >= mb[k]) if higher[k] else (ma[k] <= mb[k]) for k in ma if k in mb}
