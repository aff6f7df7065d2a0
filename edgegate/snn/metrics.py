"""Per-run metrics of the snn target and its energy estimate from per-operation constants.

Stage: targets (snn), runtime side. Input: a `SimResult` and its `Network`. Output: a plain dict
(JSON-ready) that ``SnnRunner.metrics()`` returns and ``edgegate bench`` stores.

Energy is compute only (no memory traffic, no static power), from Horowitz, "Computing's energy
problem (and what we can do about it)", ISSCC 2014, 45 nm, 0.9 V:
8-bit integer add 0.03 pJ, 32-bit integer add 0.1 pJ, 8-bit multiply 0.2 pJ. A synaptic event
(one spike reaching one target) is one int8 accumulate; a neuron update is the two leak shifts,
three 32-bit adds and a compare of the emulator's step, counted as 4 x 0.1 pJ. For comparison the
source network's multiply-accumulates (one per non-zero weight) cost 0.2 + 0.03 pJ each (int8 MAC).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgegate.snn.emulator import SimResult
from edgegate.snn.network import Network

PJ_INT8_ADD = 0.03
PJ_INT32_ADD = 0.1
PJ_INT8_MUL = 0.2
PJ_SYNOP = PJ_INT8_ADD
PJ_NEURON_UPDATE = 4 * PJ_INT32_ADD
PJ_MAC = PJ_INT8_MUL + PJ_INT8_ADD
CONSTANTS = {"synop_pj": PJ_SYNOP, "neuron_update_pj": PJ_NEURON_UPDATE, "ann_mac_pj": PJ_MAC,
             "source": "Horowitz ISSCC 2014, 45 nm: int8 add 0.03 pJ, int32 add 0.1 pJ, int8 mul 0.2 pJ"}


def summarize(net: Network, result: SimResult, timesteps: int) -> dict[str, Any]:
    """The metrics dict of one run (shape documented in docs/snn.md, "Metrics")."""
    samples = int(result.steps.shape[0])
    synops = sum(result.synops.values())
    updates = sum(result.neuron_updates.values())
    energy_synops = synops * PJ_SYNOP
    energy_updates = updates * PJ_NEURON_UPDATE
    # The source network's MACs per sample: its non-zero weights (an unrolled Conv's structural zeros are
    # not MACs); the x- half of a signed encoder mirrors the x+ half and is not counted twice.
    macs = sum(int(np.count_nonzero(g.weight)) for g in net.groups)
    if net.encoder.signed:
        macs -= int(np.count_nonzero(net.groups[0].weight[:, net.encoder.features:]))
    steps = result.steps.astype(np.float64)
    per = max(samples, 1)
    return {
        "samples": samples,
        "timesteps": timesteps,
        "timesteps_to_decision": {"mean": float(steps.mean()) if samples else 0.0,
                                  "min": int(steps.min()) if samples else 0,
                                  "max": int(steps.max()) if samples else 0},
        "spikes_per_layer": dict(result.spikes),
        "synops_per_layer": dict(result.synops),
        "spikes": int(sum(result.spikes.values())),
        "synops": int(synops),
        "neuron_updates": int(updates),
        "energy_pj": {"synops": energy_synops, "neuron_updates": energy_updates,
                      "total": energy_synops + energy_updates},
        "energy_pj_per_sample": (energy_synops + energy_updates) / per,
        "ann_energy_pj_per_sample": macs * PJ_MAC,
        "energy_vs_ann": (energy_synops + energy_updates) / per / (macs * PJ_MAC) if macs else None,
        "constants": dict(CONSTANTS),
    }
