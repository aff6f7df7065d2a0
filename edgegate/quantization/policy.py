"""Gate precision policy: which Linear/Conv layers compute gate decisions and stay in float.

Stage: quantize (DESIGN §5 "Gate precision policy"). Input: a model and its :class:`GateMap`.
Output: ``{layer path: reason}`` for every decision layer, resolved from the gate modules' types
(never from layer names), so a renamed attribute cannot silently quantize a router.

Default decision layers (kept fp32 when ``gate_precision`` is float):

* ``TopKRouter.proj`` — the router logits; a flipped top-k sends a token to another expert.
* ``MoE.const_mix`` (MoE++ constant experts) — it computes the constant experts' mixing weights.
* ``EarlyExitNet.heads`` (all of them) and ``exit_gates`` — exit heads produce both the exit score
  and the exited samples' logits; the last head is kept with them so every exit is served alike.
* ``ChannelGate.predictor`` — the per-sample channel mask.
* ``GatedAttention.gate_proj`` — the sigmoid gate logits.

``ThresholdGate`` has no layer (tau and gain are vectors inside its op) and ternary/HGF layers are
not ``nn.Linear``. A user gate class joins with :func:`register_decision_layers`, or by defining
``decision_layers() -> Iterable[nn.Module]``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

from torch import nn

from edgegate import nn as enn
from edgegate.gates import GateInfo, GateMap
from edgegate.quantization.layers import is_quantizable

log = logging.getLogger(__name__)

# (gate module, its GateInfo, the whole model) -> (decision layer, why it is one)
DecisionLayers = Callable[[nn.Module, GateInfo, nn.Module], Iterable[tuple[nn.Module, str]]]


def _layers_in(module: nn.Module) -> Iterator[nn.Module]:
    return (m for m in module.modules() if is_quantizable(m))


def _router(router: enn.TopKRouter, info: GateInfo, model: nn.Module) -> Iterator[tuple[nn.Module, str]]:
    yield router.proj, f"router projection of {info.name or 'the model'}"
    moe_path = info.details.get("moe")  # find_gates records the MoE that owns this router
    if moe_path is not None:
        moe = model.get_submodule(moe_path)
        if getattr(moe, "n_const", 0):
            yield moe.const_mix, f"MoE++ constant-expert mixing weights of {moe_path or 'the model'}"


def _early_exit(net: enn.EarlyExitNet, info: GateInfo, model: nn.Module) -> Iterator[tuple[nn.Module, str]]:
    for k, head in enumerate(net.heads):
        for layer in _layers_in(head):
            yield layer, f"exit head {k}"
    for k, gate in enumerate(getattr(net, "exit_gates", ())):
        for layer in _layers_in(gate):
            yield layer, f"learned exit gate {k}"


_DECISION_LAYERS: dict[type, DecisionLayers] = {
    enn.TopKRouter: _router,
    enn.EarlyExitNet: _early_exit,
    enn.ChannelGate: lambda m, info, model: [(m.predictor, "channel-mask predictor")],
    enn.GatedAttention: lambda m, info, model: [(m.gate_proj, "attention gate projection")],
    enn.ThresholdGate: lambda m, info, model: [],
    enn.TernaryLinear: lambda m, info, model: [],  # HGFLinear too (subclass): no nn.Linear inside
}


def register_decision_layers(cls: type, fn: DecisionLayers) -> None:
    """Declare which layers of a (user) gate class compute its decision; a duplicate is an error."""
    from edgegate.errors import EdgegateError

    if cls in _DECISION_LAYERS:
        raise EdgegateError(f"register_decision_layers: {cls.__qualname__} is already registered")
    _DECISION_LAYERS[cls] = fn


def _lookup(module: nn.Module) -> DecisionLayers | None:
    for cls in type(module).__mro__:
        if cls in _DECISION_LAYERS:
            return _DECISION_LAYERS[cls]
    own = getattr(module, "decision_layers", None)
    if callable(own):
        return lambda m, info, model: [(layer, f"decision layer of {info.module}") for layer in own()]
    return None


def decision_layers(model: nn.Module, gate_map: GateMap) -> dict[str, str]:
    """``{path: reason}`` of every quantizable layer that computes a gate decision, in model order."""
    path_of = {id(m): name for name, m in model.named_modules()}
    found: dict[str, str] = {}
    for info in gate_map:
        module = model.get_submodule(info.name)
        fn = _lookup(module)
        if fn is None:
            log.warning("gate %s (%s) declares no decision layers; its layers are quantized. Register them "
                        "with edgegate.quantization.register_decision_layers", info.name, info.module)
            continue
        for layer, reason in fn(module, info, model):
            if is_quantizable(layer) and id(layer) in path_of:
                found.setdefault(path_of[id(layer)], reason)
    position = {name: i for i, name in enumerate(path_of.values())}
    return dict(sorted(found.items(), key=lambda kv: position[kv[0]]))
