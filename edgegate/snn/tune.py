"""Choose the snn target's timesteps and early decision from calibration: least energy, same decisions.

Stage: targets (snn), compile side. Input: a compiled `Network`, the float `Chain` it came from and
calibration inputs (no labels). Output: the network with the chosen ``timesteps`` and `ExitPolicy`, and
a JSON-ready record of every configuration tried.

What a spiking network costs is spikes times steps: at the old default (128 steps, no early decision)
the digits threshold-gate model spent 17,100 pJ a sample against 2,164 pJ for the int8 ANN estimate.
The emulator is fast and deterministic, so each candidate (timesteps x early-decision margin) is simply
run on the calibration inputs. Its agreement is the fraction of inputs on which the SNN picks the same
class as the source network (the chain's own forward: label-free, and the quantity the conversion is
meant to preserve). The reference is the longest run without early decision; the choice is the
candidate with the lowest energy per sample whose agreement is at most ``MAX_AGREEMENT_LOSS`` (1 point)
below the reference's, ties to the higher agreement.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from edgegate.snn.network import ExitPolicy, Network

log = logging.getLogger(__name__)

TIMESTEPS = (16, 24, 32, 48, 64, 96, 128)
MARGINS = (2, 3, 4, 6, 8)
MAX_AGREEMENT_LOSS = 0.01
ROWS = 512  # calibration rows the trials run on


@dataclasses.dataclass(frozen=True)
class Trial:
    timesteps: int
    early: bool
    margin: int
    agreement: float
    energy_pj_per_sample: float
    mean_steps: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


def _trial(net: Network, x: np.ndarray, want: np.ndarray, timesteps: int, policy: ExitPolicy) -> Trial:
    from edgegate.snn.emulator import decode, run
    from edgegate.snn.metrics import summarize

    candidate = dataclasses.replace(net, timesteps=timesteps, exit=policy)
    result = run(candidate, x, timesteps, exit=policy)
    agreement = float(np.mean(decode(candidate, result).argmax(1) == want))
    metrics = summarize(candidate, result, timesteps)
    return Trial(timesteps, policy.enabled, policy.margin, agreement, float(metrics["energy_pj_per_sample"]),
                 float(metrics["timesteps_to_decision"]["mean"]))


def tune(net: Network, source_logits: np.ndarray, calibration: np.ndarray, *, timesteps: int | None,
         early: str, margin: int, min_steps: int, max_timesteps: int = TIMESTEPS[-1]) -> tuple[Network, dict]:
    """``net`` with timesteps and early decision chosen on ``calibration`` (see the module docstring).

    ``timesteps``: fixed by the user (None: choose among ``TIMESTEPS`` up to ``max_timesteps``);
    ``early``: "auto" (choose off or a margin of ``MARGINS``), "on" (with ``margin``) or "off";
    ``source_logits``: the source network's outputs on ``calibration`` (its decisions are the target).
    """
    x = np.asarray(calibration, np.float32)[:ROWS]
    want = np.asarray(source_logits)[:ROWS].reshape(len(x), -1).argmax(1)
    steps = [timesteps] if timesteps else [t for t in TIMESTEPS if t <= max_timesteps] or [max_timesteps]
    off = ExitPolicy(False, margin, min_steps)
    policies = {"off": [off], "on": [ExitPolicy(True, margin, min_steps)],
                "auto": [off] + [ExitPolicy(True, m, min_steps) for m in MARGINS]}[early]
    if net.output.size < 2:  # a margin between the top two outputs needs two outputs
        policies = [p for p in policies if not p.enabled] or [ExitPolicy(False, margin, min_steps)]
    cache: dict[tuple[int, ExitPolicy], Trial] = {}

    def trial(t: int, p: ExitPolicy) -> Trial:
        if (t, p) not in cache:
            cache[t, p] = _trial(net, x, want, t, p)
        return cache[t, p]

    reference = trial(max(steps), ExitPolicy(False, margin, min_steps))
    trials = [trial(t, p) for t in steps for p in policies]
    ok = ([t for t in trials if t.agreement >= reference.agreement - MAX_AGREEMENT_LOSS]
          or [max(trials, key=lambda t: t.agreement)])
    best = min(ok, key=lambda t: (t.energy_pj_per_sample, -t.agreement))
    chosen = dataclasses.replace(net, timesteps=best.timesteps, exit=ExitPolicy(best.early, best.margin, min_steps))
    log.info("snn: %d steps, early decision %s (margin %d): %.0f pJ/sample at agreement %.4f (reference %.0f pJ at "
             "%.4f)", best.timesteps, "on" if best.early else "off", best.margin, best.energy_pj_per_sample,
             best.agreement, reference.energy_pj_per_sample, reference.agreement)
    record = {"rows": int(len(x)), "max_agreement_loss": MAX_AGREEMENT_LOSS, "reference": reference.to_dict(),
              "chosen": best.to_dict(), "trials": [t.to_dict() for t in trials]}
    return chosen, record
