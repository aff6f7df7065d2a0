"""Gate discovery: which modules of a model gate what (DESIGN §1, stage ``find_gates``).

Input: an ``nn.Module``. Output: a :class:`GateMap`, one :class:`GateInfo` per gating module (its
path in the model, kind, class, details such as k / n_experts / thresholds), recorded in the bundle
manifest and used by calibration and compare. Modules are recognized by class through a registry
pre-filled with the ``edgegate.nn`` families; user modules join with :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from edgegate.errors import EdgegateError


class GateKind(StrEnum):
    SIGMOID = "sigmoid"  # soft multiplicative gate (gated attention)
    THRESHOLD = "threshold"  # per-neuron hard threshold (TauGate)
    CHANNEL = "channel"  # predicted channel mask (dynamic pruning)
    ROUTER = "router"  # top-k expert routing
    EXIT = "exit"  # early-exit decisions
    TERNARY = "ternary"  # ternary weights (no data-dependent gate, but packed/quantized specially)
    LOWRANK = "lowrank"  # gated low-rank correction (HGF)


@dataclass(frozen=True)
class GateInfo:
    """One gating module: ``name`` is its path in the model (``""`` for the model itself)."""

    name: str
    kind: GateKind
    module: str  # class name
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": str(self.kind), "module": self.module,
                "details": dict(self.details)}


@dataclass(frozen=True)
class GateMap:
    """The gates of a model, in module order."""

    gates: tuple[GateInfo, ...] = ()

    def __iter__(self) -> Iterator[GateInfo]:
        return iter(self.gates)

    def __len__(self) -> int:
        return len(self.gates)

    def __getitem__(self, name: str) -> GateInfo:
        for g in self.gates:
            if g.name == name:
                return g
        raise KeyError(name)

    def by_kind(self, kind: GateKind | str) -> tuple[GateInfo, ...]:
        kind = GateKind(kind)
        return tuple(g for g in self.gates if g.kind == kind)

    @property
    def kinds(self) -> tuple[GateKind, ...]:
        return tuple(dict.fromkeys(g.kind for g in self.gates))

    def to_dict(self) -> dict[str, Any]:
        return {"gates": [g.to_dict() for g in self.gates]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateMap:
        return cls(tuple(GateInfo(g["name"], GateKind(g["kind"]), g["module"], dict(g.get("details", {})))
                         for g in d.get("gates", [])))


# ------------------------------------------------------------------------------------------- registry

_REGISTRY: dict[type, GateKind] = {}


def register(cls: type, kind: GateKind | str) -> type:
    """Register a module class as a gate of ``kind`` (usable as a decorator: ``@register_as(kind)``).

    A module class may implement ``gate_details() -> dict`` (JSON-serializable) to describe itself.
    Registering a class again with another kind is an error.
    """
    try:
        kind = GateKind(kind)
    except ValueError:
        raise EdgegateError(f"register: unknown gate kind {kind!r}; use one of "
                            f"{', '.join(k.value for k in GateKind)}") from None
    _ensure_builtins()
    known = _REGISTRY.get(cls)
    if known is not None and known != kind:
        raise EdgegateError(f"register: {cls.__qualname__} is already registered as a {known} gate; "
                            f"it cannot also be a {kind} gate")
    _REGISTRY[cls] = kind
    return cls


def register_as(kind: GateKind | str) -> Callable[[type], type]:
    """Decorator form of :func:`register`."""
    return lambda cls: register(cls, kind)


def registered_kind(module: Any) -> GateKind | None:
    """The kind of ``module``'s most specific registered class (an HGFLinear is lowrank, not ternary)."""
    _ensure_builtins()
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


_BUILTINS_DONE = False


def _ensure_builtins() -> None:
    # Lazy: edgegate.nn imports torch; inspecting a GateMap from a manifest must not.
    global _BUILTINS_DONE
    if _BUILTINS_DONE:
        return
    _BUILTINS_DONE = True
    from edgegate import nn as enn

    for cls, kind in ((enn.GatedAttention, GateKind.SIGMOID), (enn.ThresholdGate, GateKind.THRESHOLD),
                      (enn.ChannelGate, GateKind.CHANNEL), (enn.TopKRouter, GateKind.ROUTER),
                      (enn.EarlyExitNet, GateKind.EXIT), (enn.TernaryLinear, GateKind.TERNARY),
                      (enn.HGFLinear, GateKind.LOWRANK)):
        _REGISTRY[cls] = kind


# -------------------------------------------------------------------------------------------- details


def _details(module: Any) -> dict[str, Any]:
    from edgegate import nn as enn

    if isinstance(module, enn.GatedAttention):
        return {"n_heads": module.n_heads, "mode": module.gate, "d_model": module.d_model}
    if isinstance(module, enn.ThresholdGate):
        return {"features": module.features}
    if isinstance(module, enn.ChannelGate):
        return {"in_channels": module.in_channels, "out_channels": module.out_channels}
    if isinstance(module, enn.TopKRouter):
        return {"k": module.k, "n_experts": module.n_experts}
    if isinstance(module, enn.EarlyExitNet):
        return {"n_exits": module.n_exits, "policy": module.policy,
                "thresholds": [float(t) for t in module.thresholds]}
    if isinstance(module, enn.HGFLinear):
        return {"in_features": module.in_features, "out_features": module.out_features, "rank": module.rank}
    if isinstance(module, enn.TernaryLinear):
        return {"in_features": module.in_features, "out_features": module.out_features}
    custom = getattr(module, "gate_details", None)
    return dict(custom()) if callable(custom) else {}


def find_gates(model: Any) -> GateMap:
    """Every registered gating module of ``model`` (itself included), in ``named_modules`` order."""
    from edgegate import nn as enn

    _ensure_builtins()
    moe_of: dict[str, dict[str, Any]] = {}  # router path -> its MoE's slot layout
    gates = []
    for name, module in model.named_modules():
        if isinstance(module, enn.MoE):
            prefix = f"{name}." if name else ""
            moe_of[f"{prefix}router"] = {
                "moe": name, "n_ffn": module.n_experts, "n_zero": module.n_zero, "n_copy": module.n_copy,
                "n_const": module.n_const, "slot_kinds": module.slot_kinds()}
        kind = registered_kind(module)
        if kind is None:
            continue
        details = {**_details(module), **moe_of.get(name, {})}
        gates.append(GateInfo(name, kind, type(module).__name__, details))
    return GateMap(tuple(gates))
