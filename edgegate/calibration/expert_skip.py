"""MoDES dynamic expert skipping, calibrated: the per-layer importance alpha_l and the threshold tau.

Stage: calibration (before quantization). Input: a float model whose MoE routers are
``edgegate.nn.TopKRouter`` (zoo MoE models and converted third-party MoE blocks alike), calibration
inputs (labels optional), optionally held-out inputs, and a :class:`SkipOption` (``--moe-skip
auto|off|TAU``, ``--moe-skip-budget``). Output: the routers set to skip (``TopKRouter.set_skip(alpha_l,
tau)``: after softmax -> top-k -> renormalise, a slot with ``alpha_l * w < tau`` gets weight 0, no
renormalisation) and a :class:`SkipRecord` for the manifest.

* **alpha_l** (MoDES' globally-modulated local gating): the importance of router l's layer, measured on
  the calibration data as the model's output sensitivity to it: the mean KL divergence between the
  output distribution (softmax over the last axis of the logits) of the model and of the same model
  with every routed slot of layer l dropped, divided by the largest such divergence (the most sensitive
  layer has alpha 1; a model with one MoE layer has alpha 1).
* **tau**: the largest calibration skip rate whose metric stays within the budget of the unskipped
  model. Candidates are quantiles of ``alpha_l * w`` over every routed slot of the calibration data
  (skip rates 0 to 95 % in steps of 2.5 %), searched by bisection, as MoDES' frontier search, which
  relies on the metric falling as the skip rate rises; every point tried is recorded.
* **metric**: accuracy when the data has labels (budget: accuracy points, default 0.5 pt); for a
  causal LM (logits [B, T, V] over int64 token ids) the next-token loss (budget: relative increase,
  default 0.5 %); else top-1 agreement with the unskipped model (budget: agreement points).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgegate.data import Inputs
from edgegate.errors import EdgegateError
from edgegate.gates import GateKind, GateMap
from edgegate.nn.moe import TopKRouter

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 0.005  # 0.5 pt of accuracy (or 0.5 % of loss)
QUANTILES = tuple(round(q, 3) for q in np.arange(0.025, 0.951, 0.025))
EVAL_BATCH = 256
DROP_ALL = math.inf  # a threshold no weight reaches: every slot of the router dropped


class SkipMode(StrEnum):
    OFF = "off"
    AUTO = "auto"  # search tau on the calibration data
    FIXED = "fixed"  # the user's tau; alpha_l still calibrated


class SkipMetric(StrEnum):
    ACCURACY = "accuracy"
    LM_LOSS = "lm_loss"
    AGREEMENT = "top1_agreement"

    @property
    def higher_is_better(self) -> bool:
        return self is not SkipMetric.LM_LOSS


@dataclass(frozen=True)
class SkipOption:
    """What ``--moe-skip`` asks for: ``mode``, the user's ``tau`` (FIXED) and the search ``budget``."""

    mode: SkipMode = SkipMode.OFF
    tau: float | None = None
    budget: float = DEFAULT_BUDGET

    @classmethod
    def parse(cls, text: str, budget: float = DEFAULT_BUDGET) -> SkipOption:
        """``auto``, ``off`` or a threshold TAU >= 0 (``--moe-skip``); ``budget`` >= 0 as a fraction."""
        if not (isinstance(budget, (int, float)) and 0 <= budget < 1):
            raise EdgegateError(f"--moe-skip-budget {budget * 100:g} must be >= 0 and < 100 (points of accuracy, or "
                                "percent of loss)")
        text = str(text).strip().lower()
        if text in (SkipMode.OFF, SkipMode.AUTO):
            return cls(SkipMode(text), None, float(budget))
        try:
            tau = float(text)
        except ValueError:
            raise EdgegateError(f"--moe-skip {text!r} must be auto, off or a threshold TAU >= 0 (e.g. 0.2)") from None
        if not 0 <= tau < math.inf:
            raise EdgegateError(f"--moe-skip {text}: the threshold TAU must be a finite number >= 0")
        return cls(SkipMode.FIXED, tau, float(budget))


@dataclass(frozen=True)
class SkipRecord:
    """What skipping was calibrated to (manifest ``moe_skip``). ``importance``: alpha_l per router path;
    ``sensitivity``: the raw KL divergences behind it; ``search``: every tau tried on the calibration data
    ``{tau, skip_rate, metric, within}``; ``calibration`` / ``held_out``: ``{skip_rate, unskipped,
    skipped}`` (metric values) on those rows."""

    mode: SkipMode
    metric: SkipMetric
    budget: float
    tau: float
    importance: dict[str, float]
    sensitivity: dict[str, float]
    search: tuple[dict[str, Any], ...]
    calibration: dict[str, float]
    held_out: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(mode=str(self.mode), metric=str(self.metric), search=[dict(p) for p in self.search])
        return d


def routers(model: nn.Module, gate_map: GateMap) -> dict[str, TopKRouter]:
    """The model's ``TopKRouter`` gates by path."""
    found = {g.name: model.get_submodule(g.name) for g in gate_map if g.kind is GateKind.ROUTER}
    return {p: r for p, r in found.items() if isinstance(r, TopKRouter)}


def calibrate_skip(model: nn.Module, gate_map: GateMap, calib: Inputs, labels: np.ndarray | None,
                   option: SkipOption, held_out: tuple[Inputs, np.ndarray | None] | None = None) -> SkipRecord:
    """Calibrate alpha_l, search (or take) tau and set every router of ``model`` (in place) to skip.

    ``calib`` / ``held_out``: model inputs as torch tensors (batch first) with their labels or None.
    """
    found = routers(model, gate_map)
    if not found:
        raise EdgegateError("--moe-skip needs a model with MoE routers (edgegate.nn.TopKRouter, or a converted MoE "
                            "block); this one has none: leave out --moe-skip")
    if option.mode is SkipMode.OFF:
        raise EdgegateError("calibrate_skip: --moe-skip off asks for no skipping; do not call it")
    model.eval()
    for r in found.values():
        r.set_skip(1.0, 0.0)
    base = _run(model, calib, found)
    metric = _metric_kind(base.logits, calib, labels)
    base_value = _score(metric, base.logits, calib, labels, base.logits)
    sensitivity = {}
    for path, r in found.items():
        with _skipping({path: r}, 1.0, DROP_ALL):
            sensitivity[path] = _kl(base.logits, _run(model, calib, found).logits)
    top = max(sensitivity.values())
    importance = {p: (s / top if top > 0 else 1.0) for p, s in sensitivity.items()}
    for p, r in found.items():
        r.set_skip(importance[p], 0.0)
    scaled = np.concatenate([importance[p] * w for p, w in base.weights.items()])

    def evaluate(tau: float) -> dict[str, Any]:
        with _skipping(found, None, tau):
            got = _run(model, calib, found)
        value = _score(metric, got.logits, calib, labels, base.logits)
        return {"tau": tau, "skip_rate": got.skip_rate, "metric": value,
                "within": _within(metric, value, base_value, option.budget)}

    search: list[dict[str, Any]] = []
    if option.mode is SkipMode.AUTO:
        candidates = sorted({float(np.quantile(scaled, q)) for q in QUANTILES} - {0.0})
        lo, hi, best = -1, len(candidates), {"tau": 0.0, "skip_rate": 0.0, "metric": base_value, "within": True}
        while hi - lo > 1:  # the largest candidate within budget, if the metric falls as the rate rises
            mid = (lo + hi) // 2
            point = evaluate(candidates[mid])
            search.append(point)
            if point["within"]:
                lo, best = mid, point
            else:
                hi = mid
    else:
        best = evaluate(float(option.tau))
        search.append(best)
    tau = float(best["tau"])
    for p, r in found.items():
        r.set_skip(importance[p], tau)
    record = SkipRecord(option.mode, metric, option.budget, tau, importance, sensitivity, tuple(search),
                        {"skip_rate": best["skip_rate"], "unskipped": base_value, "skipped": best["metric"]})
    if held_out is not None:
        record = dataclasses.replace(record, held_out=_measure(model, found, held_out, metric))
    log.info("moe skip: tau %.4g, alpha %s, calibration skip rate %.3f", tau, importance, best["skip_rate"])
    return record


def skip_for_export(model: nn.Module, gate_map: GateMap, option: SkipOption, calib: Any, held_out: Any,
                    names: list[str]) -> dict[str, Any]:
    """The export step: ``calibrate_skip`` on the calibration / held-out ``Dataset`` rows of the model inputs
    ``names`` (the pipeline's split); returns the manifest record."""
    def rows(data: Any) -> tuple[Inputs, np.ndarray | None]:
        x = data.model_inputs(names).map(lambda a: torch.from_numpy(np.ascontiguousarray(a)))
        return x, None if data.labels is None else np.asarray(data.labels)

    x, labels = rows(calib)
    return calibrate_skip(model, gate_map, x, labels, option, None if held_out is None else rows(held_out)).to_dict()


def _measure(model: nn.Module, found: dict[str, TopKRouter], data: tuple[Inputs, np.ndarray | None],
             metric: SkipMetric) -> dict[str, float]:
    x, labels = data
    skipped = _run(model, x, found)
    with _skipping(found, None, 0.0):
        unskipped = _run(model, x, found)
    return {"skip_rate": skipped.skip_rate, "unskipped": _score(metric, unskipped.logits, x, labels, unskipped.logits),
            "skipped": _score(metric, skipped.logits, x, labels, unskipped.logits)}


# ---------------------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class _Run:
    logits: torch.Tensor
    weights: dict[str, np.ndarray]  # router path -> renormalised weights of its deployed slots (flat)
    skip_rate: float  # dropped / routed deployed slots, over every router


@contextlib.contextmanager
def _skipping(found: dict[str, TopKRouter], importance: float | None, tau: float) -> Iterator[None]:
    """The routers' threshold (and importance, unless None) set for the duration."""
    saved = {p: (r.skip_importance, r.skip_threshold) for p, r in found.items()}
    try:
        for r in found.values():
            r.set_skip(r.skip_importance if importance is None else importance, tau)
        yield
    finally:
        for p, r in found.items():
            r.set_skip(*saved[p])


def _run(model: nn.Module, x: Inputs, found: dict[str, TopKRouter]) -> _Run:
    """The model's logits over ``x`` (in batches) and each router's deployed slot weights before skipping."""
    weights: dict[str, list[torch.Tensor]] = {p: [] for p in found}
    dropped, routed = [0], [0]
    handles = []
    for path, r in found.items():
        def hook(module: TopKRouter, args: tuple, out: tuple, _path: str = path) -> None:
            w = out[0][:, : module.k].float()
            scale = module.scale if module.scale else 1.0
            kept = w != 0
            dropped[0] += int((~kept).sum()) if module.skips else 0
            routed[0] += w.numel()
            weights[_path].append((w / scale).reshape(-1))
        handles.append(r.register_forward_hook(hook))
    outs = []
    try:
        with torch.no_grad():
            for i in range(0, len(x), EVAL_BATCH):
                out = x[i: i + EVAL_BATCH].run(model)
                outs.append((out[0] if isinstance(out, tuple) else out).float())
    finally:
        for h in handles:
            h.remove()
    flat = {p: torch.cat(w).numpy() if w else np.zeros(0, np.float32) for p, w in weights.items()}
    return _Run(torch.cat(outs), flat, dropped[0] / routed[0] if routed[0] else 0.0)


def _token_ids(x: Inputs, logits: torch.Tensor) -> torch.Tensor | None:
    """The int64 token ids [B, T] behind LM logits [B, T, V] (the first integer input of that shape)."""
    for v in x.arrays.values():
        if v.dtype == torch.int64 and v.dim() == 2 and tuple(v.shape) == tuple(logits.shape[:2]):
            return v
    return None


def _metric_kind(logits: torch.Tensor, x: Inputs, labels: np.ndarray | None) -> SkipMetric:
    if labels is not None and logits.dim() == 2:
        return SkipMetric.ACCURACY
    if logits.dim() == 3 and logits.shape[1] > 1 and _token_ids(x, logits) is not None:
        return SkipMetric.LM_LOSS
    return SkipMetric.AGREEMENT


def _score(metric: SkipMetric, logits: torch.Tensor, x: Inputs, labels: np.ndarray | None,
           reference: torch.Tensor) -> float:
    if metric is SkipMetric.ACCURACY:
        return float((logits.argmax(-1).numpy() == np.asarray(labels)).mean())
    if metric is SkipMetric.LM_LOSS:
        ids = _token_ids(x, logits)
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))
    return float((logits.argmax(-1) == reference.argmax(-1)).float().mean())


def _within(metric: SkipMetric, value: float, base: float, budget: float) -> bool:
    if metric.higher_is_better:
        return value >= base - budget - 1e-9
    return value <= base * (1 + budget) + 1e-9


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean KL(p || q) of the softmax over the last axis, per sample (or token)."""
    p = torch.log_softmax(p_logits.double(), dim=-1)
    q = torch.log_softmax(q_logits.double(), dim=-1)
    return float((p.exp() * (p - q)).sum(-1).mean())
