"""Gate kinds as calibration measures them: one :class:`GateMeasure` per kind, registered by name.

Stage: calibration (DESIGN §5 "Gate fidelity"). Input: the float and quantized decisions a gate of one
kind records (``last_decision`` after each eval forward) and the scores its decision is the sign of.
Output: what the fidelity report, the margin estimates and the fidelity-target search need to know about
the kind: its metrics (name, words, which way is better, whether a rate with a Wilson interval), how to
turn recorded float/quant decisions into held-out metrics, how many rows a decision counts, which
forward hooks keep its decision scores and how those become margin :class:`Decisions`.

``fidelity``, ``margins`` and ``search`` only read this registry. The built-in kinds are declared at the
end of this module with :func:`register_measure`, the same call a user makes for a kind of their own
(a gate kind is a name: ``GateKind`` lists the built-in ones, a user's kind is any other string given
to ``gates.register_family``). A kind without a measure (ternary, low-rank) has nothing to observe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from edgegate import nn as enn
from edgegate.errors import EdgegateError
from edgegate.gates import GateInfo, GateKind
from edgegate.metrics import decision_agreement, mask_hamming, routed_rows, top1_expert_agreement, topk_set_agreement

OUTPUT = "(output)"  # the "gate" of top-1 agreement: the model's class prediction


@dataclass(frozen=True)
class GateMetric:
    """One fidelity metric: its key in the report, its words, and ``interval``: a rate over decision rows
    (reported with its Wilson 95% interval and estimable from margins) rather than a mean error."""

    name: str
    words: str
    higher_is_better: bool
    interval: bool = True


@dataclass(frozen=True)
class Decisions:
    """Aligned binary decisions of one gate metric: decision = ``margin >= 0``, float and quantized.

    ``row``: the calibration row each decision belongs to (resampled together); ``group``: errors are
    pooled within a group (an exit, a channel, a neuron); ``rows``: what the metric divides the
    disagreeing decisions by (samples or tokens; times channels for a mask); ``held``: False for a decision
    the fidelity-target search measures and reports but does not hold to the target."""

    gate: str
    metric: str
    float_margin: np.ndarray
    quant_margin: np.ndarray
    row: np.ndarray
    group: np.ndarray
    rows: int
    held: bool = True

    def counted(self) -> float:
        """Disagreeing decisions / ``rows`` as counted (no smoothing)."""
        flips = (self.float_margin >= 0) != (self.quant_margin >= 0)
        return float(flips.sum() / max(self.rows, 1))


# (float decisions, quantized decisions, the gate) -> {metric: value, ...details} on held-out rows
Measure = Callable[[torch.Tensor, torch.Tensor, GateInfo], dict[str, Any]]
# (gate module, keep(scores)) -> hook handles that call ``keep`` with the decision scores of each forward
Capture = Callable[[nn.Module, Callable[[torch.Tensor], None]], list[RemovableHandle]]
# (the gate, float scores, quantized scores; same shape) -> the margin decisions of its metrics
Pair = Callable[[GateInfo, torch.Tensor, torch.Tensor], list[Decisions]]


def _len(decisions: torch.Tensor) -> int:
    return len(decisions)


@dataclass(frozen=True)
class GateMeasure:
    """How calibration measures the gates of one kind.

    * ``measure`` — held-out metrics from the recorded float and quantized ``last_decision``;
    * ``rows`` — the rows the rates count (one per sample by default);
    * ``capture`` + ``pair`` — the margin estimates and the fidelity-target search: hooks keeping each
      forward's decision scores, and the margin `Decisions` of two aligned captures; without them the
      kind's metrics are reported, not held by the search;
    * ``soft`` — a soft gate decides nothing by itself: the search holds the top-1 agreement of the
      prediction it leads to (when nothing else is held).

    Early exits are measured through the ``edgegate.nn.EarlyExitNet`` protocol (``margins.capture``
    scores every exit head), so their measure has no ``capture``.
    """

    kind: str
    metrics: tuple[GateMetric, ...]
    measure: Measure
    rows: Callable[[torch.Tensor], int] = _len
    capture: Capture | None = None
    pair: Pair | None = None
    soft: bool = False


_MEASURES: dict[str, GateMeasure] = {}
# The metrics of the model's output, then every registered gate metric, by name (registration order).
_OUTPUT_METRICS = (GateMetric("accuracy", "accuracy", True), GateMetric("loss", "loss", False, interval=False),
                   GateMetric("top1_agreement", "top-1 agreement", True),
                   GateMetric("output_sqnr_db", "output SQNR dB", True, interval=False))
_METRICS: dict[str, GateMetric] = {m.name: m for m in _OUTPUT_METRICS}
WORDS: dict[str, str] = {m.name: m.words for m in _OUTPUT_METRICS}  # metric -> words, kept up to date on register


def register_measure(measure: GateMeasure) -> GateMeasure:
    """Declare how calibration measures gates of ``measure.kind`` (re-declaring a kind replaces it). A metric
    name another kind already declared must mean the same (channel and threshold gates share mask_hamming)."""
    for m in measure.metrics:
        known = _METRICS.get(m.name)
        if known is not None and known != m:
            raise EdgegateError(f"register_measure: metric {m.name!r} of kind {measure.kind!r} is already declared "
                                f"differently ({known}); give it another name")
    _MEASURES[str(measure.kind)] = measure
    for m in measure.metrics:
        _METRICS.setdefault(m.name, m)
        WORDS.setdefault(m.name, m.words)
    return measure


def measure_of(kind: str) -> GateMeasure | None:
    """The measure of gate kind ``kind`` (a GateKind or a user's kind name), None when it has none."""
    return _MEASURES.get(str(kind))


def gate_metrics() -> tuple[GateMetric, ...]:
    """Every gate metric of a registered kind, in registration order."""
    names = dict.fromkeys(m.name for s in _MEASURES.values() for m in s.metrics)
    return tuple(_METRICS[n] for n in names)


def metric(name: str) -> GateMetric:
    """The declared metric ``name`` (output or gate metric)."""
    try:
        return _METRICS[name]
    except KeyError:
        raise EdgegateError(f"unknown fidelity metric {name!r}; declare it in a GateMeasure "
                            "(edgegate.calibration.kinds.register_measure)") from None


def higher_is_better() -> dict[str, bool]:
    """Metric -> True when higher is better: the output metrics, then every gate metric."""
    return {m.name: m.higher_is_better for m in (*_OUTPUT_METRICS, *gate_metrics())}


@contextlib.contextmanager
def removing(handles: Iterable[RemovableHandle] = ()) -> Iterator[list[RemovableHandle]]:
    """The hook handles added to the yielded list (and ``handles``) are removed on exit, whatever happens."""
    held = list(handles)
    try:
        yield held
    finally:
        for h in held:
            h.remove()


# ------------------------------------------------------------------------------------ margin builders


def set_margins(scores: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Worst chosen score minus best other score, per row: >= 0 iff ``chosen`` is still the top set."""
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter(1, chosen, True)
    return scores.masked_fill(~mask, float("inf")).amin(1) - scores.masked_fill(mask, float("-inf")).amax(1)


def ranked(fs: torch.Tensor, qs: torch.Tensor, k: int, gate: str, metric: str, *, held: bool = True) -> Decisions:
    """Decisions "the float model's top-``k`` choice stays the top ``k``", one per row of ``fs`` [rows, choices]."""
    chosen = torch.topk(fs, k, dim=-1).indices
    n = len(fs)
    return Decisions(gate, metric, set_margins(fs, chosen).numpy(), set_margins(qs, chosen).numpy(),
                     np.arange(n), np.zeros(n, dtype=np.int64), n, held)


def per_feature(gate: str, fm: torch.Tensor, qm: torch.Tensor, metric: str = "mask_hamming") -> Decisions:
    """Mask decisions [rows, features] (leading dims flattened to rows); errors pooled per feature."""
    width = fm.shape[-1]
    fm, qm = fm.reshape(-1, width).double(), qm.reshape(-1, width).double()
    n = len(fm)
    return Decisions(gate, metric, fm.flatten().numpy(), qm.flatten().numpy(),
                     np.repeat(np.arange(n), width), np.tile(np.arange(width), n), n * width)


# ------------------------------------------------------------------------------------- built-in kinds
# Declared in this order, which is the order of the metrics in reports, summaries and the search record.


def _exits(f: torch.Tensor, q: torch.Tensor, info: GateInfo) -> dict[str, Any]:
    n = info.details.get("n_exits") or int(max(f.max(), q.max())) + 1
    frac = {name: [float(v) for v in torch.bincount(t, minlength=n).float() / len(t)]
            for name, t in (("float", f), ("quant", q))}
    return {"exit_agreement": decision_agreement(f.numpy(), q.numpy()), "exit_fractions": frac}


register_measure(GateMeasure(GateKind.EXIT, (GateMetric("exit_agreement", "exit agreement", True),), _exits))


def _router_scores(module: nn.Module, keep: Callable[[torch.Tensor], None]) -> list[RemovableHandle]:
    if not isinstance(module, enn.TopKRouter):
        return []
    scores = getattr(module, "choice_scores", None)  # what top-k ranks (softmax is monotone)
    return [module.proj.register_forward_hook(
        lambda m, args, out: keep((scores(out) if callable(scores) else out).float()))]


def _router_pair(info: GateInfo, fs: torch.Tensor, qs: torch.Tensor) -> list[Decisions]:
    # A router decides its top-k set: which experts compute. Which expert of the set ranks first changes no expert's
    # work (for k >= 2 only which of two near-equal weights is larger; for k = 1 the set is the top-1), so top-1
    # expert agreement is measured and reported but held only by a router without a set (one computing every expert).
    k = int(info.details.get("k", 1))
    sets = [ranked(fs, qs, k, info.name, "topk_set_agreement")] if k < fs.shape[-1] else []
    return [*sets, ranked(fs, qs, 1, info.name, "top1_expert_agreement", held=not sets)]


register_measure(GateMeasure(
    GateKind.ROUTER,
    (GateMetric("topk_set_agreement", "top-k set agreement", True),
     GateMetric("top1_expert_agreement", "top-1 expert agreement", True)),
    lambda f, q, info: {"topk_set_agreement": topk_set_agreement(f.numpy(), q.numpy()),
                        "top1_expert_agreement": top1_expert_agreement(f.numpy(), q.numpy())},
    rows=lambda f: routed_rows(f.numpy()),  # one route per token (leading dims)
    capture=_router_scores, pair=_router_pair))

_MASK = GateMetric("mask_hamming", "mask Hamming distance", False)


def _masks(f: torch.Tensor, q: torch.Tensor, info: GateInfo) -> dict[str, Any]:
    return {"mask_hamming": mask_hamming(f.numpy(), q.numpy()),
            "open_fraction": {"float": float(f.float().mean()), "quant": float(q.float().mean())}}


def _mask_pair(info: GateInfo, fs: torch.Tensor, qs: torch.Tensor) -> list[Decisions]:
    return [per_feature(info.name, fs, qs)]


def _channel_logits(module: nn.Module, keep: Callable[[torch.Tensor], None]) -> list[RemovableHandle]:
    if not isinstance(module, enn.ChannelGate):
        return []
    return [module.predictor.register_forward_hook(lambda m, args, out: keep(out.float()))]


def _threshold_margins(module: nn.Module, keep: Callable[[torch.Tensor], None]) -> list[RemovableHandle]:
    if not isinstance(module, enn.ThresholdGate):
        return []
    return [module.register_forward_pre_hook(lambda m, args: keep((args[0] - m.tau).float()))]


register_measure(GateMeasure(GateKind.CHANNEL, (_MASK,), _masks, capture=_channel_logits, pair=_mask_pair))
register_measure(GateMeasure(GateKind.THRESHOLD, (_MASK,), _masks, capture=_threshold_margins, pair=_mask_pair))
register_measure(GateMeasure(
    GateKind.SIGMOID, (GateMetric("gate_mae", "gate mean |error|", False, interval=False),),
    lambda f, q, info: {"gate_mae": float((f.float() - q.float()).abs().mean())}, soft=True))


def _learner_logits(module: nn.Module, keep: Callable[[torch.Tensor], None]) -> list[RemovableHandle]:
    if not isinstance(module, enn.ACM):
        return []
    return [module.gate.register_forward_hook(lambda m, args, out: keep(out.reshape(-1, out.shape[-1]).float()))]


register_measure(GateMeasure(
    GateKind.LEARNERS, (GateMetric("count_agreement", "learner-count agreement", True),),
    lambda f, q, info: {"count_agreement": decision_agreement(f.numpy(), q.numpy()),
                        "mean_count": {"float": float(f.float().mean()), "quant": float(q.float().mean())}},
    rows=lambda f: int(f.numel()),  # one learner count per token
    capture=_learner_logits,
    pair=lambda info, fs, qs: [ranked(fs, qs, 1, info.name, "count_agreement")]))  # k = argmax of N+1 logits
