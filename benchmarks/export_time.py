"""Section 5, export wall time: ``edgegate export --target cpu --quant int8`` per zoo model (+ the CNN).

Each export is a fresh ``run_export`` from the trained checkpoint (training is not part of it and is
reported apart), including data loading, gate-aware calibration, threshold re-tuning, fidelity,
ONNX export, QDQ insertion, the target check and compile, and the golden self-check. Repeated
(median of the repeats; the first export of a process also pays one-time imports and op
registration, which the median leaves out and ``first_s`` shows). The stage breakdown is the
pipeline's own ``manifest["timings_s"]``, median per step over the repeats. The goal (< 60 s) is
for a 2-core machine: ``cpus_usable`` in the machine record says how many this run had.
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.harness import MIN_REPEATS, Sizes, goal
from benchmarks.workspace import RESNET, Workspace

FULL_MODELS = ("gated_attention", "threshold_gate", "channel_gate", "moe", "moe_pp", "early_exit", "ternary_lm",
               "hgf_lm", "float_lm", RESNET)
SMOKE_MODELS = ("early_exit",)
SMOKE_REPEATS = 2
GOAL_S = 60.0


def run(ws: Workspace, sizes: Sizes) -> dict[str, Any]:
    repeats = SMOKE_REPEATS if sizes.smoke else MIN_REPEATS
    rows, errors, goals = [], [], []
    for name in SMOKE_MODELS if sizes.smoke else FULL_MODELS:
        try:
            ws.checkpoint(name)
            exports = [ws.export(name, "int8", fresh=True, tag=f"-timed{i}") for i in range(repeats)]
        except Exception as e:
            errors.append({"model": name, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"})
            continue
        walls = [e.wall_s for e in exports]
        steps = {k: round(statistics.median(e.timings_s.get(k, 0.0) for e in exports), 4)
                 for k in exports[0].timings_s}
        wall = round(statistics.median(walls), 3)
        rows.append({"model": name, "wall_s": wall, "first_s": walls[0], "max_s": max(walls), "repeats": repeats,
                     "steps_s": steps, "train_s": ws.train_seconds.get(name)})
        goals.append(goal(f"{name}: int8 export < {GOAL_S:.0f} s", f"< {GOAL_S:.0f} s", wall, wall < GOAL_S,
                          f"slowest step {max(steps, key=steps.get)} ({max(steps.values())} s)"))
    return {"method": __doc__.split("\n\n", 1)[1].strip(), "models": rows, "errors": errors, "goals": goals}
