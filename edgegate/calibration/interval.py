"""Confidence intervals for agreement rates: how far a measured fraction can be trusted.

Stage: calibration report (fidelity in the manifest and in ``compare``). Input: a measured fraction and
the number of rows it was counted over. Output: a Wilson score interval (95% by default), plain floats.
Standard library only, so reports and the runtime side can use it.

Why Wilson and not the normal approximation: agreements sit next to 1 (0.995 and up), where the
normal interval is symmetric, crosses 1 and collapses to a point when no row disagrees. Wilson's stays
inside [0, 1] and still has width with zero disagreements (1.0 on 270 rows is [0.986, 1.0]: the
reason a few hundred rows cannot resolve half a percent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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
