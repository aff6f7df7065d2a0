"""Decision margins and the expected disagreement they imply: gate fidelity estimated from every row.

Stage: calibration (the fidelity-target search, ``edgegate.calibration.search``). Input: the float and
the quantized model, calibration inputs and the GateMap. Output: per gate and metric, the expected
disagreement rate, its bootstrap standard error, and the counted one.

Why not count flips alone: on a few hundred calibration rows a decision flips for one or two rows, so
a count tells 0.996 from 0.993 by luck (one row of 270 is 0.37%). Every gate decision is the sign of a
*margin* (exit: logit of the exit score minus logit of the threshold; top-k set: the k-th best expert
score minus the best of the rest; top-1: best minus second; ACM learner count: the chosen count's gate
logit minus the best other; channel mask: the mask logit; threshold gate: ``h - tau``). Quantization
adds an error ``e = margin_quant - margin_float``. Pairing each row's
float margin with every row's error of the same decision group (one exit, one router, one channel)
estimates the probability that this row's decision flips; the mean over rows is the expected
disagreement, a U-statistic that uses every row's margin and error instead of the few that flipped.
On the zoo models it tracks the disagreement on thousands of held-out rows about twice as closely as
the count on the calibration rows does. Its standard error comes from resampling the rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgegate.calibration.gating import exit_thresholds
from edgegate.calibration.kinds import OUTPUT, Decisions, measure_of, metric, ranked, removing
from edgegate.calibration.probe import GatedParts, Probe, exit_score
from edgegate.calibration.record import Estimate
from edgegate.data import Inputs
from edgegate.gates import GateMap

BOOTSTRAP = 200  # row resamples for the standard error
BOOTSTRAP_SEED = 0
_CLIP = 1e-7  # exit scores are compared in logit space; clip so a saturated softmax stays finite

# ------------------------------------------------------------------------------------------ estimator


def _expected_flips(fm: np.ndarray, err: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Expected flipped decisions of one group, once per row of ``weights`` ([B, n] row weights).

    A decision ``fm_i >= 0`` flips under error ``e_j`` when ``fm_i + e_j`` falls on the other side of 0.
    """
    order = np.argsort(err, kind="stable")
    sorted_err = err[order]
    cum = np.concatenate([np.zeros((weights.shape[0], 1)), np.cumsum(weights[:, order], axis=1)], axis=1)
    total = cum[:, -1:]
    below = cum[:, np.searchsorted(sorted_err, -fm, side="left")]  # weight of errors e_j < -fm_i
    p_flip = np.where(fm >= 0, below, total - below) / np.maximum(total, 1e-300)
    return (weights * p_flip).sum(axis=1)


def expected_disagreement(d: Decisions, weights: np.ndarray | None = None) -> np.ndarray:
    """Expected disagreement rate of ``d`` for each weighting of its rows (``weights`` [B, n_rows];
    default: every row once, B = 1)."""
    if weights is None:
        weights = np.ones((1, int(d.row.max(initial=-1)) + 1))
    flips = np.zeros(weights.shape[0])
    per_decision = weights[:, d.row]
    for g in np.unique(d.group):
        pick = d.group == g
        fm = d.float_margin[pick].astype(np.float64)
        flips += _expected_flips(fm, d.quant_margin[pick].astype(np.float64) - fm, per_decision[:, pick])
    # ``rows`` decisions per unit weight: a resample keeps the same number of rows in total.
    return flips / max(d.rows, 1)


def estimate(d: Decisions) -> Estimate:
    """The counted and the expected disagreement of ``d``, and the bootstrap SE of the expected one."""
    point = float(expected_disagreement(d)[0])
    n_rows = int(d.row.max(initial=-1)) + 1
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    counts = rng.multinomial(n_rows, np.full(n_rows, 1.0 / n_rows), size=BOOTSTRAP).astype(np.float64)
    se = float(np.std(expected_disagreement(d, counts), ddof=1)) if n_rows > 1 else 1.0
    counted = d.counted()
    if not metric(d.metric).higher_is_better:  # a disagreement itself (mask Hamming distance)
        return Estimate(d.gate, d.metric, counted, point, se, d.rows)
    return Estimate(d.gate, d.metric, 1.0 - counted, 1.0 - point, se, d.rows)


# ---------------------------------------------------------------------------------------- the margins


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.double().clamp(_CLIP, 1 - _CLIP)
    return torch.log(p) - torch.log1p(-p)


@dataclass(frozen=True)
class Capture:
    """One model's decision scores on the same rows: per early-exit net, each exit's score for every row
    (no row exits) and the thresholds, and the exit each row takes as deployed; per router / mask gate,
    its scores; the class logits ([N, C]; None for any other output). ``pair`` lines two captures up into
    `Decisions`."""

    exit_scores: dict[str, list[torch.Tensor]]
    thresholds: dict[str, list[float]]
    exit_index: dict[str, torch.Tensor]
    gates: dict[str, torch.Tensor]
    logits: torch.Tensor | None


def capture(model: nn.Module, x: Inputs, gate_map: GateMap) -> Capture:
    """Run ``model`` (eval) on ``x`` once as deployed, and once more with no exit when it has exits."""
    parts = GatedParts.of(model, gate_map)
    with torch.no_grad(), _captured(model, gate_map) as got, Probe(model, [], parts) as deployed:
        out = x.run(model)
    logits = out[0] if isinstance(out, tuple) else out
    scores: dict[str, list[torch.Tensor]] = {}
    if parts.exits:
        never = {p: [float("inf")] * (net.n_exits - 1) for p, net in parts.exits.items()}
        with torch.no_grad(), exit_thresholds(parts, never), Probe(model, [], parts, keep_heads=True) as probe:
            x.run(model)  # no row exits: every head scores every row
        scores = {p: [exit_score(net, k, probe.heads(p, k)) for k in range(net.n_exits - 1)]
                  for p, net in parts.exits.items()}
    # Only class logits [N, C] are paired (top-1 agreement); a causal LM's [N, T, V] logits are not kept, since
    # the search holds the float capture throughout (256 MiB for 512 x 16 tokens of an 8 192-word vocabulary).
    kept = logits if isinstance(logits, torch.Tensor) and logits.dim() == 2 else None
    return Capture(scores, {p: [float(t) for t in net.thresholds] for p, net in parts.exits.items()},
                   {p: deployed.exits(p).cpu() for p in parts.exits},
                   {n: torch.cat(v) for n, v in got.items()}, kept)


def _exit_decisions(path: str, f: Capture, q: Capture) -> Decisions | None:
    """Per exit k before the last, the rows that reach k under the float model's deployed gating; margin =
    logit(score) - logit(threshold), each model with its own threshold (the quantized one re-tuned)."""
    exit_f = f.exit_index[path]
    rows = len(exit_f)
    fm, qm, row, group = [], [], [], []
    for k, (sf, sq) in enumerate(zip(f.exit_scores[path], q.exit_scores[path], strict=True)):
        if len(sf) != rows or len(sq) != rows:
            return None
        reach = torch.nonzero(exit_f >= k).flatten()
        tf, tq = (torch.tensor([c.thresholds[path][k]]) for c in (f, q))
        fm.append((_logit(sf) - _logit(tf))[reach].numpy())
        qm.append((_logit(sq) - _logit(tq))[reach].numpy())
        row.append(reach.numpy())
        group.append(np.full(len(reach), k))
    if not fm:
        return None
    return Decisions(path, "exit_agreement", np.concatenate(fm), np.concatenate(qm), np.concatenate(row),
                     np.concatenate(group), rows)


@contextlib.contextmanager
def _captured(model: nn.Module, gate_map: GateMap) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Each gate's decision scores, kept by the hooks its kind's measure installs (``kinds.GateMeasure.capture``):
    router scores, ACM gate logits, channel-mask logits, threshold margins..."""
    got: dict[str, list[torch.Tensor]] = {}

    def keeper(name: str) -> Callable[[torch.Tensor], None]:
        return lambda value: got.setdefault(name, []).append(value.detach())

    with removing() as handles:
        for info in gate_map:
            spec = measure_of(info.kind)
            if spec is not None and spec.capture is not None:
                handles += spec.capture(model.get_submodule(info.name), keeper(info.name))
        yield got


def pair(f: Capture, q: Capture, gate_map: GateMap, *, top1: bool = False) -> list[Decisions]:
    """The decisions of float capture ``f`` and quantized capture ``q`` (same rows); with ``top1`` also the
    predicted class (top-1 agreement). Gates whose rows differ between the two (e.g. inside a compacted
    stage) are left out."""
    out = [d for p in f.exit_scores if p in q.exit_scores for d in [_exit_decisions(p, f, q)] if d is not None]
    for info in gate_map:
        if info.name not in f.gates or info.name not in q.gates:
            continue
        fs, qs = f.gates[info.name], q.gates[info.name]
        if fs.shape != qs.shape:
            continue
        spec = measure_of(info.kind)
        if spec is not None and spec.pair is not None:
            out += spec.pair(info, fs, qs)
    fl, ql = f.logits, q.logits
    if top1 and fl is not None and ql is not None and fl.dim() == 2 and fl.shape == ql.shape and fl.shape[-1] > 1:
        out.append(ranked(fl.double(), ql.double(), 1, OUTPUT, "top1_agreement"))
    return out


def collect_decisions(float_model: nn.Module, quant_model: nn.Module, x: Inputs, gate_map: GateMap,
                      *, top1: bool = False) -> list[Decisions]:
    """Every measurable gate decision of both models on ``x`` (eval mode); see `pair`."""
    return pair(capture(float_model, x, gate_map), capture(quant_model, x, gate_map), gate_map, top1=top1)
