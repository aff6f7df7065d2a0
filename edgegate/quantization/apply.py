"""Apply a quantization config to a model, and read the calibrated quantizers back as a QuantPlan.

Stage: quantize (DESIGN §1). Input: a float model, a :class:`QuantConfig` and its :class:`GateMap`.
Output: a fake-quantized deep copy (``quantize``) and, once calibrated, the :class:`QuantPlan` that
the ONNX lowering consumes (``plan_from``). Calibration itself (driving the quantizers with data
under the deployed gating) is ``edgegate.calibration``; a freshly quantized model is uncalibrated.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from torch import nn

from edgegate.data import Inputs
from edgegate.errors import EdgegateError
from edgegate.gates import GateMap, find_gates
from edgegate.quantization.config import QuantConfig
from edgegate.quantization.functional import FunctionalQuant, build, fused_conv_outputs, plan_ops
from edgegate.quantization.layers import ACT_QUANT, EmptySafeQuantConv2d, is_quantizable, quant_layer, quantizes_output
from edgegate.quantization.layout import trace_layout
from edgegate.quantization.plan import LayerKind, LayerQuant, QdqForm, QuantPlan
from edgegate.quantization.policy import decision_layers

TRACE_ROWS = 512  # example rows the layout trace runs on (it needs the structure, not statistics)


class QuantModules(dict):
    """The swapped quant layers by path, plus ``functional``: the model's functional-op quantizers (or None)."""

    functional: FunctionalQuant | None = None


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path), child, module)


def kept_float(model: nn.Module, config: QuantConfig, gate_map: GateMap) -> dict[str, str]:
    """``{path: reason}`` of the quantizable layers ``quantize`` leaves in float under ``config``.

    A16W8 layers stay float for the ``symmetric`` form: TensorRT has no 16-bit integer activations; ``float_layers``
    (chosen for gate fidelity) stay float everywhere.
    """
    keep = decision_layers(model, gate_map) if config.gates_in_float else {}
    keep.update({p: "feeds a gate decision; kept float for gate fidelity" for p in config.float_layers})
    if config.qdq_form is QdqForm.SYMMETRIC:
        keep.update({p: "decision-critical (A16W8 on cpu); TensorRT has no int16 activations"
                     for p in config.a16_layers})
    return keep


def quantize(model: nn.Module, config: QuantConfig | None = None, gate_map: GateMap | None = None,
             example: Inputs | torch.Tensor | None = None) -> tuple[nn.Module, QuantModules]:
    """A copy of ``model`` (eval mode) with each plain ``nn.Linear``/``nn.Conv2d`` replaced by its
    brevitas layer, except the gate decision layers when the gate precision policy keeps them float. The copy
    shares ``model``'s parameters (each brevitas layer its float layer's weight; biases are its own, which bias
    correction writes): deep-copy it before training it.

    With ``example`` inputs and the ``asymmetric`` form, the functional ops between the layers are quantized too
    (``edgegate.quantization.layout``: residual adds, concatenations, pooling, hardswish... where every
    input is quantized), traced on ``example`` under the model's own (deployed) gating.

    Returns ``(quantized model, {path: quant layer})`` (a :class:`QuantModules`). The quantizers are
    uncalibrated: run ``edgegate.calibration.calibrate`` (which calls this) rather than using them directly.
    """
    config = config or QuantConfig()
    gate_map = find_gates(model) if gate_map is None else gate_map
    # The module tree copied, the parameters shared (the brevitas layers share the weights too, `quant_layer`):
    # nothing here writes a float parameter in place, and a copy of the weights is the size of the model.
    qmodel = copy.deepcopy(model, {id(p): p for p in model.parameters()}).eval()
    keep = kept_float(qmodel, config, gate_map)
    targets = {path: m for path, m in qmodel.named_modules() if is_quantizable(m) and path not in keep}
    for path, module in targets.items():
        if path in config.a16_layers and not isinstance(module, nn.Linear):
            raise EdgegateError(f"a16 layer {path} is a {type(module).__name__}; A16W8 is for Linear layers")
    layout = None
    if config.qdq_form is QdqForm.ASYMMETRIC and example is not None and targets:
        convs = {p for p, m in targets.items() if quantizes_output(m, config.qdq_form)}
        layout = trace_layout(qmodel, example[:TRACE_ROWS], targets, convs)
    swapped = QuantModules()
    for path, module in targets.items():
        anchor = layout.anchors.get(f"layer:{path}") if layout is not None else None
        q = quant_layer(module, config, 16 if path in config.a16_layers else 8,
                        output=anchor is None or anchor.relu is None)
        _set_submodule(qmodel, path, q)
        swapped[path] = q
    if layout is not None and not layout.empty:
        swapped.functional = build(layout, ACT_QUANT[(config.qdq_form, config.observer)], swapped)
        if swapped.functional is not None:
            swapped.functional.attach(qmodel)
    return qmodel, swapped


def float_layers(qmodel: nn.Module) -> tuple[str, ...]:
    """Paths of the plain Linear/Conv layers left in float in a quantized model."""
    return tuple(path for path, m in qmodel.named_modules() if is_quantizable(m))


def unquantize_layer(qmodel: nn.Module, path: str, float_module: nn.Module) -> None:
    """Put a float layer back (a quantizer that could not be calibrated must not ship)."""
    _set_submodule(qmodel, path, copy.deepcopy(float_module).eval())


def _layer_quant(name: str, q: nn.Module, samples: int) -> LayerQuant:
    with torch.no_grad():
        act, out = q.input_quant, q.output_quant
        quantized_out = out.is_quant_enabled
        wq = q.quant_weight()
        bias = None if q.bias is None else q.bias.detach().float().cpu().numpy()
        return LayerQuant(
            name=name,
            kind=LayerKind.CONV if isinstance(q, EmptySafeQuantConv2d) else LayerKind.LINEAR,
            act_scale=float(act.scale().detach()),
            act_zero_point=int(round(float(act.zero_point().detach()))),
            act_signed=bool(act.is_signed),
            weight_int=wq.int().detach().to(torch.int8).cpu().numpy(),
            weight_scale=wq.scale.detach().reshape(-1).float().cpu().numpy().astype(np.float32),
            bias=bias,
            samples=int(samples),
            act_bits=int(round(float(act.bit_width().detach()))),
            out_scale=float(out.scale().detach()) if quantized_out else None,
            out_zero_point=int(round(float(out.zero_point().detach()))) if quantized_out else None,
        )


def plan_from(swapped: dict[str, nn.Module], qdq_form: QdqForm | str, float_layers: tuple[str, ...] | list[str],
              counts: dict[str, int]) -> QuantPlan:
    """Read calibrated brevitas layers back into a :class:`QuantPlan` (numpy arrays, float bias).

    ``counts``: calibration rows each layer saw (``LayerQuant.samples``).
    """
    layers = {name: _layer_quant(name, q, counts.get(name, 0)) for name, q in swapped.items()}
    functional = getattr(swapped, "functional", None)
    for name, (scale, zp) in fused_conv_outputs(functional).items():
        if name in layers:
            layers[name] = dataclasses.replace(layers[name], out_scale=scale, out_zero_point=zp, out_after_relu=True)
    return QuantPlan(QdqForm(qdq_form), layers, tuple(float_layers), plan_ops(functional, swapped))
