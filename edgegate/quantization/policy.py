"""Gate precision policy: which Linear/Conv layers compute gate decisions and stay in float.

Stage: quantize (DESIGN §5 "Gate precision policy"). Input: a model and its :class:`GateMap`.
Output: ``{layer path: reason}`` for every decision layer, resolved from the gate modules' families
(``edgegate.gates.GateFamily.decision_layers``, never from layer names), so a renamed attribute cannot
silently quantize a router. Built-in families declare, e.g.:

* ``TopKRouter.proj`` — the router logits; a flipped top-k sends a token to another expert.
* ``MoE.const_mix`` (MoE++ constant experts) — it computes the constant experts' mixing weights.
* ``EarlyExitNet.heads`` (all of them) and ``exit_gates`` — exit heads produce both the exit score
  and the exited samples' logits; the last head is kept with them so every exit is served alike.
* ``ChannelGate.predictor``, ``GatedAttention.gate_proj``, ``GatedSharedExpert.gate`` — masks and
  sigmoid gate logits.

``ThresholdGate`` has no layer (tau and gain are vectors inside its op) and ternary/HGF layers are
not ``nn.Linear``. A user gate class declares its layers when it is registered
(``edgegate.gates.register(cls, kind, decision_layers=...)`` or a ``decision_layers()`` method), or
here with :func:`register_decision_layers`, which takes precedence over the family's declaration.
"""

from __future__ import annotations

import logging

from torch import nn

from edgegate.errors import EdgegateError
from edgegate.gates import DecisionLayers, GateMap, family_of
from edgegate.quantization.layers import is_quantizable

log = logging.getLogger(__name__)

_OVERRIDES: dict[type, DecisionLayers] = {}


def register_decision_layers(cls: type, fn: DecisionLayers) -> None:
    """Declare which layers of a (user) gate class compute its decision; a duplicate is an error."""

    if cls in _OVERRIDES:
        raise EdgegateError(f"register_decision_layers: {cls.__qualname__} is already registered")
    _OVERRIDES[cls] = fn


def _lookup(module: nn.Module) -> DecisionLayers | None:
    for cls in type(module).__mro__:
        if cls in _OVERRIDES:
            return _OVERRIDES[cls]
    family = family_of(module)
    if family is None or not family.declares_decision_layers:
        return None
    return family.decision_layers


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
