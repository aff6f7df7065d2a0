"""The metrics every stage reports with: gate agreement, output agreement, SQNR and their confidence intervals.

Bottom layer, numpy and the standard library only, so calibration (on torch tensors, converted), the export's
golden check, ``compare``, the benchmarks and the runtime side count a metric the same way. Input: the float
model's decisions or outputs and the quantized model's, row-aligned. Output: plain floats (fractions in [0, 1],
decibels) and `Interval` records.

Agreement rates sit next to 1 (0.995 and up), where the normal interval is symmetric, crosses 1 and collapses
to a point when no row disagrees; Wilson's score interval stays inside [0, 1] and still has width with zero
disagreements (1.0 on 270 rows is [0.986, 1.0]: the reason a few hundred rows cannot resolve half a percent).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Z95 = 1.959963984540054  # two-sided 95%: the normal quantile 0.975


@dataclass(frozen=True)
class Interval:
    """``value`` measured over ``rows`` rows, with its Wilson interval ``[low, high]``."""

    value: float
    low: float
    high: float
    rows: int

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "low": self.low, "high": self.high, "rows": self.rows}


def wilson(fraction: float, rows: int, z: float = Z95) -> Interval:
    """Wilson score interval of a proportion ``fraction`` observed over ``rows`` Bernoulli trials.

    ``fraction`` may be non-integral times ``rows`` (e.g. a mean Hamming distance counted per sample);
    ``rows`` < 1 gives the uninformative interval [0, 1].
    """
    p = min(max(float(fraction), 0.0), 1.0)
    if rows < 1:
        return Interval(p, 0.0, 1.0, int(rows))
    z2 = z * z
    denominator = 1 + z2 / rows
    centre = (p + z2 / (2 * rows)) / denominator
    half = z * math.sqrt(p * (1 - p) / rows + z2 / (4 * rows * rows)) / denominator
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), int(rows))


_SQNR_SLICE = 1 << 20  # elements per float64 slice in sqnr_db


def sqnr_db(reference: Any, test: Any) -> float:
    """10 log10(signal / noise) of ``test`` against ``reference`` (inf when identical, -inf for a zero signal)."""
    ref, tst = (a.reshape(-1) for a in np.broadcast_arrays(np.asarray(reference), np.asarray(test)))
    noise = signal = 0.0
    # Summed in float64 a slice at a time: float64 copies of whole arrays cost 8x their length in memory (2 GiB
    # transient for a causal LM's logits of 512 x 16 tokens x 8 192 words).
    for i in range(0, len(ref), _SQNR_SLICE):
        r, t = ref[i:i + _SQNR_SLICE].astype(np.float64), tst[i:i + _SQNR_SLICE].astype(np.float64)
        noise += float(np.square(r - t).sum())
        signal += float(np.square(r).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal else -math.inf


def top1_agreement(reference: Any, test: Any) -> float:
    """Share of rows whose argmax over the last axis is the same."""
    return float(np.mean(np.asarray(reference).argmax(-1) == np.asarray(test).argmax(-1)))


def decision_agreement(reference: Any, test: Any) -> float:
    """Share of rows with the same discrete decision: the exit a sample leaves at, the learners a token runs."""
    return float(np.mean(np.asarray(reference) == np.asarray(test)))


def topk_set_agreement(reference: Any, test: Any) -> float:
    """Share of routed rows (every leading dim) whose set of k experts (last axis, any order) is the same."""
    a, b = np.sort(np.asarray(reference), -1), np.sort(np.asarray(test), -1)
    return float(np.mean(np.all(a == b, -1)))


def top1_expert_agreement(reference: Any, test: Any) -> float:
    """Share of routed rows whose first (highest-weight) expert is the same."""
    return float(np.mean(np.asarray(reference)[..., 0] == np.asarray(test)[..., 0]))


def mask_hamming(reference: Any, test: Any) -> float:
    """Share of mask bits (channels, thresholds) that differ."""
    return float(np.mean(np.asarray(reference) != np.asarray(test)))


def routed_rows(route: Any) -> int:
    """How many routing decisions a route tensor [..., k] holds (one per token)."""
    r = np.asarray(route)
    return int(r.size // r.shape[-1]) if r.ndim else 0


def output_agreement(got: Sequence[np.ndarray], want: Sequence[np.ndarray], names: Sequence[str]) -> dict[str, float]:
    """How closely a runtime follows its reference, output by output: integer outputs (exit index, routes) by
    exact agreement; float ones by max abs error, scale (max |reference|) and, for [N, C] logits, top-1."""
    out: dict[str, float] = {}
    for name, g, w in zip(names, got, want, strict=True):
        if g.dtype.kind in "iub":
            out[f"{name}_agreement"] = float(np.mean(g == w))
            continue
        out[f"{name}_max_abs_err"] = float(np.max(np.abs(g.astype(np.float64) - w)))
        out[f"{name}_scale"] = float(np.max(np.abs(w)))
        if g.ndim >= 2:
            out[f"{name}_top1_agreement"] = top1_agreement(w, g)
    return out
