"""Bias correction on path-conditional data: remove the mean output error quantization adds.

Stage: calibration, after the activation quantizers are calibrated. Input: the calibrated fake-quant
model, calibration inputs, the calibration gating. Output: corrected biases (in place) and the size
of each correction for the record.

For each quantized layer with a bias, over the rows that reach it (so expert e is corrected on its
routed tokens, stage k on the samples that did not exit): ``bias -= mean(y_quant - y_float)`` per
output channel, where both are computed from the same input (the quantized model's own). A gate's
decision flips when its input drifts; a systematic drift is what bias correction removes (it raised
top-k agreement of the MoE zoo models measurably). Layers without a bias are left alone: adding one
would change the graph the exporter lowers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgegate.data import Inputs


def _float_op(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, layer.weight, layer.bias)


def correct_biases(qmodel: nn.Module, x: Inputs, swapped: dict[str, nn.Module]) -> dict[str, float]:
    """One forward of ``qmodel`` (run it under the calibration gating); returns ``{path: max |change|}``."""
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook_for(path: str):
        def hook(layer: nn.Module, args: tuple, out: torch.Tensor) -> None:
            inp = args[0]
            if inp.numel() == 0:
                return
            err = (out - _float_op(layer, inp)).double()
            channel = 1 if isinstance(layer, nn.Conv2d) else err.dim() - 1
            err = err.movedim(channel, -1).reshape(-1, err.shape[channel])
            sums[path] = sums.get(path, 0) + err.sum(0)
            rows[path] = rows.get(path, 0) + err.shape[0]
        return hook

    targets = {p: q for p, q in swapped.items() if q.bias is not None}
    handles = [q.register_forward_hook(hook_for(p)) for p, q in targets.items()]
    try:
        with torch.no_grad():
            x.run(qmodel)
    finally:
        for h in handles:
            h.remove()
    changes = {}
    with torch.no_grad():
        for path, total in sums.items():
            delta = (total / rows[path]).to(targets[path].bias.dtype)
            targets[path].bias.sub_(delta)
            changes[path] = float(delta.abs().max())
    return changes
