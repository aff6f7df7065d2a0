"""Re-tuning early-exit thresholds on the quantized model (DESIGN §5 "Threshold re-tuning").

Stage: calibration, after the quantizers are calibrated. Input: the float and the quantized model,
calibration inputs. Output: new thresholds set on the quantized model, and ``{net path: {"before",
"after"}}`` for the record (the lead sets ``after`` on the float model before ONNX export).

Quantization shifts the exit scores a little; a fixed threshold then moves samples between exits.
Per exit k, in order, the quantized model's threshold is refitted so that exactly as many
calibration samples leave at k as leave the float model there (quantile matching on the quantized
model's scores of the samples reaching k). A threshold that already gives the float count is kept:
re-tuning must not move a threshold for noise.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgegate.calibration.probe import GatedParts, Probe, exit_scores
from edgegate.data import Inputs


def matched_threshold(scores: np.ndarray, n_exit: int, current: float) -> float:
    """A threshold with exactly ``n_exit`` of ``scores`` >= it (fewer/more only on ties): ``current``
    when it already does, else the midpoint of the gap between the n-th and (n+1)-th largest score."""
    s = np.sort(scores.astype(np.float32))[::-1]
    if len(s) == 0:
        return current
    n_exit = min(max(n_exit, 0), len(s))
    if int((s >= np.float32(current)).sum()) == n_exit:
        return current
    if n_exit == 0:
        return float(np.nextafter(s[0], np.float32(np.inf)))
    if n_exit == len(s):
        return float(s[-1])
    hi, lo = s[n_exit - 1], s[n_exit]
    mid = np.float32((np.float64(hi) + np.float64(lo)) / 2)
    if not lo < mid <= hi:  # a tie (hi == lo) or a gap of one float: cannot separate, keep the exits
        mid = hi
    return float(mid)


def retune_exit_thresholds(float_model: nn.Module, qmodel: nn.Module, x: Inputs, fparts: GatedParts,
                           qparts: GatedParts) -> dict[str, dict[str, list[float]]]:
    """Refit each net's thresholds on ``qmodel`` (in place) to the float model's exit counts on ``x``."""
    if not qparts.exits:
        return {}
    with torch.no_grad(), Probe(float_model, [], fparts) as ref:
        x.run(float_model)
    target = {p: np.bincount(ref.exits(p).cpu().numpy(), minlength=net.n_exits)
              for p, net in fparts.exits.items()}
    before = {p: [float(t) for t in net.thresholds] for p, net in qparts.exits.items()}
    depth = max(net.n_exits for net in qparts.exits.values())
    for k in range(depth - 1):
        # Exits before k are already refitted, so the samples reaching k are the quantized model's own.
        for path, scores in exit_scores(qmodel, x, qparts, k).items():
            net = qparts.exits[path]
            new = [float(t) for t in net.thresholds]
            new[k] = matched_threshold(scores, int(target[path][k]), new[k])
            net.set_thresholds(new)
    return {p: {"before": before[p], "after": [float(t) for t in net.thresholds]} for p, net in qparts.exits.items()}
