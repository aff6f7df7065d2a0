"""Fake-quantize functional ops in a quantized model's forward, where the :class:`Layout` put quantizers.

Stage: quantize (DESIGN §5). Input: a quantized model (brevitas layers swapped in), its ``Layout`` and the
activation quantizer type. Output: a :class:`FunctionalQuant` module attached to the model, whose root
hooks run each forward under a torch function mode that applies a brevitas activation quantizer after
every quantized functional op (``x + y``, ``torch.cat``, pooling, hardswish...) and after every ReLU that
took over a Conv's or an op's output quantizer. The quantizers are ordinary submodules of the model:
``brevitas.graph.calibrate.calibration_mode`` calibrates them with the layers, in the same forward, under
the gating the collector chose (gate-aware as every other quantizer), and ``plan_ops`` reads them back
into the plan's ``OpQuant`` records.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from edgegate.quantization.layout import Layout
from edgegate.quantization.plan import OpQuant
from edgegate.quantization.sites import FUNCTIONS, OpKind, ScopeTracker

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*fast_hadamard_transform.*")
    import brevitas.nn as qnn
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer
    from brevitas.proxy.runtime_quant import ActQuantProxyFromInjector
    from brevitas.quant_tensor import QuantTensor

log = logging.getLogger(__name__)

ATTRIBUTE = "edgegate_functional"  # the controller's attribute on the quantized model


def is_quant_internal(module: nn.Module) -> bool:
    """Modules whose insides are not the user's code: quant layers and quantizers."""
    return isinstance(module, (QuantWeightBiasInputOutputLayer, ActQuantProxyFromInjector, FunctionalQuant))


def new_quantizer(act_quant) -> ActQuantProxyFromInjector:
    """A fresh activation quantizer of the given brevitas quantizer type (uncalibrated)."""
    return qnn.QuantIdentity(act_quant=act_quant, return_quant_tensor=False).act_quant


def _value(y) -> torch.Tensor:
    return y.value if isinstance(y, QuantTensor) else y


class _Apply(TorchFunctionMode):
    def __init__(self, owner: FunctionalQuant, tracker: ScopeTracker) -> None:
        super().__init__()
        self.owner, self.tracker = owner, tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = None if self.tracker.skipping else FUNCTIONS.get(getattr(func, "__name__", ""))
        if kind is None:
            return func(*args, **kwargs)
        name = self.owner.actions.get(self.tracker.site(kind).key)
        out = func(*args, **kwargs)
        if name is None or not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.numel() == 0:
            return out
        y = _value(self.owner.quantizers[name](out))
        if args and out is args[0]:  # in place (x += y, relu_): quantize in place, as the caller reads x
            with torch.no_grad():
                out.copy_(y)
            return out
        return y


class FunctionalQuant(nn.Module):
    """The functional-op quantizers of one quantized model and the sites they apply at."""

    def __init__(self, layout: Layout, quantizers: dict[str, nn.Module], actions: dict[str, str]) -> None:
        super().__init__()
        self.layout = layout
        self.quantizers = nn.ModuleDict(quantizers)  # name -> brevitas activation quantizer
        self.actions = dict(actions)  # site key -> quantizer name (applied to the call's output)
        self._active: list[tuple[ScopeTracker, _Apply, object]] = []

    def attach(self, model: nn.Module) -> None:
        """Register on ``model`` (as its submodule ``edgegate_functional`` and as root forward hooks)."""
        setattr(model, ATTRIBUTE, self)
        model.register_forward_pre_hook(self._enter)
        model.register_forward_hook(self._exit, always_call=True)

    def _enter(self, model: nn.Module, args: tuple) -> None:
        tracker = ScopeTracker(model, skip=is_quant_internal)
        scope = tracker.active()
        scope.__enter__()
        mode = _Apply(self, tracker)
        mode.__enter__()
        self._active.append((tracker, mode, scope))

    def _exit(self, model: nn.Module, args: tuple, out) -> None:
        if not self._active:
            return
        tracker, mode, scope = self._active.pop()
        mode.__exit__(None, None, None)
        scope.__exit__(None, None, None)


def functional_of(model: nn.Module) -> FunctionalQuant | None:
    found = getattr(model, ATTRIBUTE, None)
    return found if isinstance(found, FunctionalQuant) else None


def build(layout: Layout, act_quant, layers: dict[str, nn.Module]) -> FunctionalQuant | None:
    """Quantizers for the layout's op anchors and fused-ReLU conv anchors; shares them as layer inputs.

    ``layers``: the swapped quant layers by path (non-fused convs quantize their own output; their
    ``output_quant`` is the anchor's quantizer). Returns None when no functional op is quantized.
    """
    quantizers: dict[str, nn.Module] = {}
    names: dict[str, str] = {}  # anchor id -> quantizer name
    actions: dict[str, str] = {}
    for anchor_id, anchor in layout.anchors.items():
        if anchor.from_layer and anchor.relu is None:
            continue  # the conv's own output quantizer
        name = f"q{len(quantizers)}"
        quantizers[name] = new_quantizer(act_quant)
        names[anchor_id] = name
        actions[anchor.relu or anchor.producer] = name
    if not quantizers:
        return None
    controller = FunctionalQuant(layout, quantizers, actions)
    for path, anchor_id in layout.layer_inputs.items():
        layer = layers.get(path)
        if layer is None or getattr(layer, "act_bits", 8) != 8:
            continue
        q = quantizer_of(controller, layers, anchor_id)
        if q is not None:
            layer.input_quant = q  # one quantizer per tensor: every reader sees the same grid
    return controller


def quantizer_of(controller: FunctionalQuant, layers: dict[str, nn.Module], anchor_id: str) -> nn.Module | None:
    anchor = controller.layout.anchors[anchor_id]
    if anchor.from_layer and anchor.relu is None:
        layer = layers.get(anchor.producer)
        return None if layer is None else layer.output_quant
    name = next((n for a, n in _anchor_names(controller).items() if a == anchor_id), None)
    return None if name is None else controller.quantizers[name]


def _anchor_names(controller: FunctionalQuant) -> dict[str, str]:
    out = {}
    for anchor_id, anchor in controller.layout.anchors.items():
        name = controller.actions.get(anchor.relu or anchor.producer)
        if name is not None and not (anchor.from_layer and anchor.relu is None):
            out[anchor_id] = name
    return out


def _params(q: nn.Module) -> tuple[float, int, bool]:
    return (float(q.scale().detach()), int(round(float(q.zero_point().detach()))), bool(q.is_signed))


def fused_conv_outputs(controller: FunctionalQuant | None) -> dict[str, tuple[float, int]]:
    """``{conv path: (scale, zero point)}`` of convs whose output quantizer sits after their ReLU."""
    if controller is None:
        return {}
    names = _anchor_names(controller)
    out = {}
    with torch.no_grad():
        for anchor_id, anchor in controller.layout.anchors.items():
            if anchor.from_layer and anchor.relu is not None and anchor_id in names:
                scale, zp, _ = _params(controller.quantizers[names[anchor_id]])
                out[anchor.producer] = (scale, zp)
    return out


def plan_ops(controller: FunctionalQuant | None, layers: dict[str, nn.Module]) -> dict[str, OpQuant]:
    """The quantized functional ops (compute and transparent) with their calibrated output quantizers."""
    if controller is None:
        return {}
    layout = controller.layout
    out: dict[str, OpQuant] = {}
    with torch.no_grad():
        for key, (site, anchor_id) in sorted(layout.sites.items()):
            q = quantizer_of(controller, layers, anchor_id)
            if q is None:
                continue
            scale, zp, signed = _params(q)
            anchor = layout.anchors[anchor_id]
            after_relu = anchor.relu is not None and not anchor.from_layer and anchor.producer == key
            out[key] = OpQuant(key=key, scope=site.scope, kind=str(site.kind), ordinal=site.ordinal,
                               calls=layout.group_sizes.get((site.scope, OpKind(site.kind)), 0), out_scale=scale,
                               out_zero_point=zp, out_signed=signed, out_after_relu=after_relu)
    return out
