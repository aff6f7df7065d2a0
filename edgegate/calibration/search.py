"""The fidelity-target search: the cheapest calibration whose gates keep agreeing with the float model.

Stage: calibrate (DESIGN §5 "Gate fidelity"); ``calibrate``, the stage's entry point, lives here. Input:
a float model, calibration inputs, a :class:`QuantConfig` (``fidelity_target``, and which means it
allows) and the GateMap. Output: the chosen calibrated model and its :class:`CalibrationRecord`, carrying
a :class:`SearchRecord` of every try (its settings and what it measured) and, when no try met the
target, the one-line warning naming the best value reached. One calibration is
``collect.calibrate_once``; naive calibration and a target of 0 run just that.

The means, tried in order of cost: those free at inference first (in order of calibration time), then
those that cost latency. Each try is a full calibration (gate-aware: every observer sees the rows that
reach it, each expert its own tokens) judged on the calibration rows, on the gate metrics the model
has: exit agreement, top-k set agreement (a router's decision; its top-1 expert agreement is measured
and reported, held only for a router that computes every expert), 1 - mask Hamming distance,
learner-count agreement (ACM); for a model whose
only gates are soft (sigmoid), the top-1 agreement of its prediction.

1. ``int8``: path-conditional observers alone;
2. ``retune``: + exit thresholds re-tuned on the quantized model (early-exit models);
3. ``bias_correction``: + each layer's mean output error removed on its own rows (1-3 finish one
   observation of the quantizers three ways and are all judged: equally free, the best is kept);
4. ``observer``: the other activation observers (minmax, percentile, mse) on the best of 1-3;
5. ``float``: layers that feed a failing gate kept in float, greedily, most helpful first (router inputs,
   channel-gate predictors' inputs, the stages in front of an exit, threshold-gate pre-activations);
6. ``a16w8``: 16-bit inputs (int8 weights, two byte-sliced integer matmuls on cpu) for Linear layers that
   feed a gate still failing, on the room ``float`` left; not for ``trt``, which has no 16-bit activations.
   At most ``max_promoted_layers`` layers over 5 and 6.

Float comes before A16W8 because on the cpu target it is the cheaper of the two: ONNX Runtime on x86 runs an
A16W8 Linear (two ``MatMulInteger``, their rescale and the 16-bit split) slower than the same layer in float
(the latency-aware pass measures both and floats such layers), and float is exact where A16W8 still
rounds the weights. Measured on the early_exit zoo model (seeds 0 and 2): float-first met the target with
one or two float stages in 7-8 tries, at 0.9-0.98x the plain INT8 latency; A16W8-first took 10 tries and
chose one A16W8 plus one float stage, at 1.1-1.16x.

The search stops at the first try (the best of 1-3) that meets the target, else keeps the best of all.
A try meets the target when, for every gate metric it applies to, both the counted value on the
calibration rows and the value expected from the decision margins less ``SAFETY_SE`` standard errors
(``calibration.margins``) meet it: a few hundred rows cannot resolve half a percent by counting alone,
and a try that only passes by luck would miss on held-out rows. A layer "feeds" a gate when it runs
before the gate decides, in a forward with every gate open.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import torch
from torch import nn

from edgegate import nn as enn
from edgegate.calibration import kinds
from edgegate.calibration.collect import Observed, calibrate_once, finish, finished_state, observe, restore_state
from edgegate.calibration.gating import naive_gating
from edgegate.calibration.inputs import Specs, as_inputs, check_fits
from edgegate.calibration.kinds import OUTPUT, gate_metrics, measure_of, metric
from edgegate.calibration.margins import capture, estimate, pair
from edgegate.calibration.probe import GatedParts
from edgegate.calibration.record import CalibrationRecord, Estimate, SearchRecord, Try
from edgegate.data import Inputs
from edgegate.gates import GateMap, find_gates
from edgegate.quantization.config import Observer, QuantConfig
from edgegate.quantization.layers import is_quantizable
from edgegate.quantization.plan import LayerKind, QdqForm

log = logging.getLogger(__name__)


class Means(StrEnum):
    """What a try adds, in the order the search tries them."""

    INT8 = "int8"
    RETUNE = "retune"
    BIAS = "bias_correction"
    OBSERVER = "observer"
    FLOAT = "float"
    A16W8 = "a16w8"


OBSERVERS = (Observer.MINMAX, Observer.PERCENTILE, Observer.MSE)  # by calibration time
# Standard errors the expected agreement must clear the target by. With two, a try that cleared the target by
# 0.00006 on 897 calibration rows (expected 0.99685 +- 0.0009) fell short on held-out rows for one MoE seed in
# five (0.9944 on 900 rows); three keep a one-sided ~99.9% confidence that the agreement reaches the target.
SAFETY_SE = 3.0
MAX_CANDIDATES = 4  # feeders tried per greedy step, nearest to the failing gate first
FEEDER_ROWS = 4  # rows of the forward that orders layers and gates
# Metric -> its words in the export text: every registered kind's (``calibration.kinds``; a live dict).
WORDS = kinds.WORDS


def margin(e: Estimate, target: float) -> float:
    """How far ``e`` clears ``target``, counted and expected-less-``SAFETY_SE``-SEs alike (negative: it misses)."""
    if metric(e.metric).higher_is_better:  # an agreement
        return min(e.value, e.expected - SAFETY_SE * e.se) - target
    # A disagreement: 1 - Hamming must reach the target.
    return (1 - target) - max(e.value, e.expected + SAFETY_SE * e.se)


def settings(config: QuantConfig) -> dict[str, Any]:
    return {"observer": str(config.observer), "retune_thresholds": config.retune_thresholds,
            "bias_correction": config.bias_correction, "a16_layers": list(config.a16_layers),
            "float_layers": list(config.float_layers)}


def feeders(model: nn.Module, x: Inputs, gate_map: GateMap) -> dict[str, list[str]]:
    """``{gate: [Linear/Conv paths that run before it decides, nearest first]}`` (``OUTPUT``: the model's
    output, which every layer feeds), from one forward of a few rows with every gate open. An early-exit net
    decides at its last exit head but one."""
    order: list[str] = []
    seen: dict[str, list[str]] = {}
    points: dict[str, nn.Module] = {}
    for info in gate_map:
        module = model.get_submodule(info.name)
        is_net = isinstance(module, enn.EarlyExitNet) and module.n_exits > 1
        points[info.name] = module.heads[-2] if is_net else module
    def ran(path: str) -> Callable[..., None]:
        return lambda module, args: order.append(path)

    def decides(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, list(dict.fromkeys(order)))  # its first call: what ran before it
        return hook

    # Decision points first: when the point is itself a layer (an exit head), it has not run yet.
    handles = [point.register_forward_pre_hook(decides(name)) for name, point in points.items()]
    handles += [m.register_forward_pre_hook(ran(p)) for p, m in model.named_modules() if is_quantizable(m)]
    try:
        with torch.no_grad(), naive_gating(GatedParts.of(model, gate_map)):
            x[:FEEDER_ROWS].run(model)
    finally:
        for h in handles:
            h.remove()
    out = {name: list(reversed(layers)) for name, layers in seen.items()}
    out[OUTPUT] = list(reversed(dict.fromkeys(order)))
    return out


class _Search:
    def __init__(self, model: nn.Module, x: Inputs, config: QuantConfig, gate_map: GateMap) -> None:
        self.model, self.x, self.config, self.gate_map = model, x, config, gate_map
        self.target = float(config.fidelity_target)
        self.tries: list[Try] = []
        self.configs: list[QuantConfig] = []
        self.best: tuple[int, nn.Module, CalibrationRecord] | None = None
        self.reference = capture(model, x, gate_map)  # the float side, the same for every try
        decisions = pair(self.reference, self.reference, gate_map, top1=True)
        available = {d.metric for d in decisions}
        # A soft gate (sigmoid) decides nothing by itself: its fidelity is the prediction it leads to. A model
        # with no data-dependent gate at all (plain, ternary) has no gate fidelity to hold.
        soft = any(getattr(measure_of(g.kind), "soft", False) for g in gate_map) and "top1_agreement" in available
        held = (m.name for m in gate_metrics() if m.name in available)
        self.metrics = tuple(held) or (("top1_agreement",) if soft else ())
        # What a kind measures but does not hold (a router's top-1 expert when it has a top-k set) says so itself.
        self.held = frozenset((d.gate, d.metric) for d in decisions if d.metric in self.metrics and d.held)
        self.metrics = tuple(m for m in self.metrics if any(held == m for _, held in self.held))

    def attempt(self, means: Means, config: QuantConfig, observed: Observed | None = None) -> Try:
        """Calibrate with ``config`` (finishing ``observed`` in place when given) and judge it."""
        started = time.perf_counter()
        observed = observed or observe(self.model, self.x, config, self.gate_map, None)
        qmodel, record = finish(observed, config)
        decisions = pair(self.reference, capture(qmodel, self.x, self.gate_map), self.gate_map, top1=True)
        measured = tuple(estimate(d) for d in decisions)
        judged = [e for e in measured if self.holds(e)]
        worst = min((margin(e, self.target) for e in judged), default=0.0)
        t = Try(str(means), settings(config), measured, worst, worst >= 0, time.perf_counter() - started)
        self.tries.append(t)
        self.configs.append(config)
        log.info("fidelity search: %s %s -> margin %+.4f%s", means, settings(config), worst,
                 " (meets the target)" if t.passed else "")
        if self.best is None or worst > self.tries[self.best[0]].margin:
            self.best = (len(self.tries) - 1, qmodel, record)
        return t

    def holds(self, e: Estimate) -> bool:
        """Whether the search holds ``e`` to the target (the rest is measured and reported)."""
        return (e.gate, e.metric) in self.held

    @property
    def met(self) -> bool:
        return self.best is not None and self.tries[self.best[0]].passed

    def best_config(self) -> QuantConfig:
        assert self.best is not None
        return self.configs[self.best[0]]

    def failing(self) -> list[str]:
        """Gates whose metric misses the target in the best try so far (``OUTPUT``: top-1 agreement)."""
        assert self.best is not None
        t = self.tries[self.best[0]]
        return list(dict.fromkeys(e.gate for e in t.measured if self.holds(e) and margin(e, self.target) < 0))

    def promote(self, means: Means, quantized: dict[str, LayerKind], fed: dict[str, list[str]]) -> None:
        """Greedy, on top of the best try so far: promote each layer feeding a failing gate in turn (nearest
        first); stop at the first that meets the target, else keep the most helpful one and go on, until
        ``max_promoted_layers`` layers are promoted or no candidate helps."""
        base = self.config
        while not self.met:
            start = self.best_config()
            promoted = ((set(start.a16_layers) - set(base.a16_layers))
                        | (set(start.float_layers) - set(base.float_layers)))
            if len(promoted) >= self.config.max_promoted_layers:
                return
            done = set(start.float_layers) | (set(start.a16_layers) if means is Means.A16W8 else set())
            candidates = [p for gate in self.failing() for p in fed.get(gate, []) if p in quantized
                          and p not in done and (means is Means.FLOAT or quantized[p] is LayerKind.LINEAR)]
            candidates = list(dict.fromkeys(candidates))[:MAX_CANDIDATES]
            if not candidates:
                return
            before = self.tries[self.best[0]].margin
            for p in candidates:
                if means is Means.A16W8:
                    cfg = dataclasses.replace(start, a16_layers=(*start.a16_layers, p))
                else:
                    cfg = dataclasses.replace(start, a16_layers=tuple(a for a in start.a16_layers if a != p),
                                              float_layers=(*start.float_layers, p))
                if self.attempt(means, cfg).passed:
                    return
            if self.tries[self.best[0]].margin <= before:
                return  # no candidate helped

    def run(self) -> tuple[nn.Module, CalibrationRecord]:
        c = self.config
        has_exits = bool(GatedParts.of(self.model, self.gate_map).exits)
        ladder = [(Means.INT8, dataclasses.replace(c, retune_thresholds=False, bias_correction=False))]
        if c.retune_thresholds and has_exits:
            ladder.append((Means.RETUNE, dataclasses.replace(ladder[-1][1], retune_thresholds=True)))
        if c.bias_correction:
            ladder.append((Means.BIAS, dataclasses.replace(ladder[-1][1], bias_correction=True)))
        # These differ only after the quantizers are observed: observe once, finish each in place from the observed
        # state (a copy of the model per try would hold its weights twice). All of them are judged: they cost
        # nothing at inference and nothing more to calibrate, so the best one is kept.
        observed = observe(self.model, self.x, ladder[0][1], self.gate_map, None)
        fresh, states = finished_state(observed), []
        for means, cfg in ladder:
            restore_state(observed, fresh)
            self.attempt(means, cfg, observed)
            states.append(finished_state(observed))
        assert self.best is not None
        restore_state(observed, states[self.best[0]])  # the model every ladder try shared, as the best left it
        del observed, fresh, states
        if self.met:
            return self.finish()
        free = self.best_config()
        for observer in (o for o in OBSERVERS if o != free.observer):
            if self.attempt(Means.OBSERVER, dataclasses.replace(free, observer=observer)).passed:
                return self.finish()
        if c.max_promoted_layers > 0:
            assert self.best is not None
            quantized = {p: q.kind for p, q in self.best[2].plan.layers.items()}
            fed = feeders(self.model, self.x, self.gate_map)
            self.promote(Means.FLOAT, quantized, fed)
            # the symmetric form (TensorRT) has no 16-bit activations: an A16W8 layer would run in float anyway
            if c.qdq_form is QdqForm.ASYMMETRIC:
                self.promote(Means.A16W8, quantized, fed)
        return self.finish()

    def finish(self) -> tuple[nn.Module, CalibrationRecord]:
        assert self.best is not None
        index, qmodel, record = self.best
        chosen = self.tries[index]
        warning = None if chosen.passed else self.warning(chosen)
        if warning:
            log.warning("%s", warning)
        search = SearchRecord(self.target, self.metrics, len(self.x), tuple(self.tries), index, warning)
        a16 = [p for p in chosen.settings["a16_layers"] if p not in self.config.a16_layers]
        if a16:
            first = min((margin(e, self.target) for e in self.tries[0].measured if self.holds(e)),
                        default=0.0)
            record = dataclasses.replace(record, a16={"layers": a16, "target": self.target,
                                                      "margin": {"before": first, "after": chosen.margin}})
        return qmodel, dataclasses.replace(record, search=search)

    def warning(self, chosen: Try) -> str:
        worst = min((e for e in chosen.measured if self.holds(e)),
                    key=lambda e: margin(e, self.target))
        how = describe(chosen)
        where = worst.gate or type(self.model).__name__
        return (f"fidelity target {self.target:g} not met on the {len(self.x)} calibration rows: the best of "
                f"{len(self.tries)} tries ({how}) reaches {metric(worst.metric).words} {worst.value:.4f} (expected "
                f"{worst.expected:.4f} +- {worst.se:.4f}) at {where}; exported with it")


def describe(t: Try) -> str:
    """A try in words: its means and the layers it promoted."""
    s = t.settings
    parts = [f"observer {s['observer']}"]
    parts += [w for w, on in (("re-tuned thresholds", s["retune_thresholds"]),
                              ("bias correction", s["bias_correction"])) if on]
    if s["a16_layers"]:
        parts.append(f"A16W8 {', '.join(s['a16_layers'])}")
    if s["float_layers"]:
        parts.append(f"float {', '.join(s['float_layers'])}")
    return ", ".join(parts)


def calibrate(model: nn.Module, data: Any, config: QuantConfig | None = None, gate_map: GateMap | None = None,
              *, input_spec: Specs = None) -> tuple[nn.Module, CalibrationRecord]:
    """Quantize a copy of ``model`` and calibrate it on ``data`` ([N, ...] per input: one np.ndarray or
    torch.Tensor, or several as a tuple in forward's order, a dict or Inputs keyed by input name).
    ``input_spec``: the model's TensorSpec (or one per input) to check the data against.

    Returns ``(quantized model, record)``; ``model`` itself is not modified. Raises ``DataError``
    (naming the input) for empty, NaN/Inf or ill-shaped data before any work. Gate-aware calibration
    with a ``config.fidelity_target`` (default 0.995) tries its means in order of cost until every gate
    agrees with the float model that often on the calibration rows (module doc); the record's ``search``
    lists every try and the choice. Naive calibration, a target of 0, or a model without a gate to hold
    (no gate decision, and no soft gate whose top-1 agreement stands in for one) is calibrated once, as
    configured.
    """
    config = config or QuantConfig()
    gate_map = find_gates(model) if gate_map is None else gate_map
    if not config.gate_aware or config.fidelity_target <= 0:
        return calibrate_once(model, data, config, gate_map, input_spec)
    x = as_inputs(data, model, input_spec)
    check_fits(model.eval(), x)  # a wrong shape is a DataError here, before the search runs the model
    search = _Search(model, x, config, gate_map)
    if not search.metrics:
        log.info("fidelity search: no gate decision or soft gate to hold; calibrated once, as configured")
        return calibrate_once(model, x, config, gate_map)
    return search.run()
