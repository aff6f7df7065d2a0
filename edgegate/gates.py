"""Gate discovery: which modules of a model gate what (DESIGN §1, stage ``find_gates``).

Input: an ``nn.Module``. Output: a :class:`GateMap`, one :class:`GateInfo` per gating module (its
path in the model, kind, class, details such as k / n_experts / thresholds), recorded in the bundle
manifest and used by calibration and compare.

A module is a gate because its class belongs to a :class:`GateFamily`: the family says how edgegate
treats it, not just what to call it:

* ``details(module)`` — what the manifest records about it;
* ``decision_layers(module, info, model)`` — the layers that compute its decision, which the gate
  precision policy keeps in float (``edgegate.quantization.policy``);
* ``observe`` — the protocol calibration and fidelity read (:class:`Observe`): an early-exit net's
  stages/heads/thresholds, an MoE router's slots, a recorded ``last_decision``, or nothing (static).

Built-in and converted families use the same path: a module that defines a family calls
:func:`register_family` for its classes when imported, and :data:`FAMILY_MODULES` lists the modules
that define the built-in ones (the registry lines). Adding a family is one module plus one line.
:func:`register` is the short form for a user class; it only accepts what edgegate can actually do
with the class (see there).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from edgegate.errors import EdgegateError


class GateKind(StrEnum):
    """The built-in gate kinds. A kind is a name: a user's kind is any other string given to
    :func:`register_family`, measured once ``edgegate.calibration.kinds.register_measure`` declares how."""

    SIGMOID = "sigmoid"  # soft multiplicative gate (gated attention, gated shared expert)
    THRESHOLD = "threshold"  # per-neuron hard threshold (TauGate)
    CHANNEL = "channel"  # predicted channel mask (dynamic pruning)
    ROUTER = "router"  # top-k expert routing
    EXIT = "exit"  # early-exit decisions
    TERNARY = "ternary"  # ternary weights (no data-dependent gate, but packed/quantized specially)
    LOWRANK = "lowrank"  # gated low-rank correction (HGF)
    LEARNERS = "learners"  # how many of a module's learners each token runs (ACM)


class Observe(StrEnum):
    """The protocol calibration and fidelity use to observe a gate family.

    * ``exits`` — the module is an ``edgegate.nn.EarlyExitNet`` (``stages``, ``heads``, ``thresholds``,
      ``decide(k, logits)``, ``set_thresholds``): rows per stage, threshold augmentation and re-tuning,
      exit-index agreement; exported as ``If`` (batch 1) or compaction.
    * ``routes`` — the module is an ``edgegate.nn.TopKRouter`` inside an ``edgegate.nn.MoE``
      (``router(x) -> (weights, indices)``, ``router.choice_scores(x)``, ``moe.experts``, ``moe.dispatch``):
      rows per expert, routing widened for coverage, top-k set agreement.
    * ``learners`` — the module is an ``edgegate.nn.ACM`` (``learners``, ``counts(x)``, ``coverage_extra``):
      rows per learner, counts widened for coverage, agreement of the chosen count; exported as ``If``
      (one token) or per-learner compaction.
    * ``decision`` — the module records ``last_decision`` after each eval forward: fidelity compares it
      float vs quantized (mask Hamming distance, gate MAE). Nothing else changes at calibration.
    * ``static`` — no data-dependent decision (ternary weights): nothing to observe.
    """

    EXITS = "exits"
    ROUTES = "routes"
    LEARNERS = "learners"
    DECISION = "decision"
    STATIC = "static"


# (gate module, its GateInfo, the whole model) -> (decision layer, why it is one)
DecisionLayers = Callable[[Any, "GateInfo", Any], Iterable[tuple[Any, str]]]


def _no_details(module: Any) -> dict[str, Any]:
    custom = getattr(module, "gate_details", None)
    return dict(custom()) if callable(custom) else {}


def _own_decision_layers(module: Any, info: GateInfo, model: Any) -> Iterable[tuple[Any, str]]:
    own = getattr(module, "decision_layers", None)
    return [(layer, f"decision layer of {info.module}") for layer in own()] if callable(own) else []


def kind_of(name: GateKind | str) -> GateKind | str:
    """A built-in kind as its GateKind member, a user's kind as its name."""
    try:
        return GateKind(name)
    except ValueError:
        return str(name)


@dataclass(frozen=True)
class GateFamily:
    """How edgegate treats the modules of one class (and its subclasses)."""

    kind: GateKind | str  # a user's kind by name (GateKind holds the built-in ones)
    observe: Observe
    details: Callable[[Any], dict[str, Any]] = _no_details
    decision_layers: DecisionLayers = _own_decision_layers
    declares_decision_layers: bool = True  # False: a user label without them (the policy warns)
    summary: str = ""  # what it gates and what stays float, in words (docs/models.md)


@dataclass(frozen=True)
class GateInfo:
    """One gating module: ``name`` is its path in the model (``""`` for the model itself)."""

    name: str
    kind: GateKind | str
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
        kind = kind_of(kind)
        return tuple(g for g in self.gates if g.kind == kind)

    @property
    def kinds(self) -> tuple[GateKind | str, ...]:
        return tuple(dict.fromkeys(g.kind for g in self.gates))

    def to_dict(self) -> dict[str, Any]:
        return {"gates": [g.to_dict() for g in self.gates]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateMap:
        return cls(tuple(GateInfo(g["name"], kind_of(g["kind"]), g["module"], dict(g.get("details", {})))
                         for g in d.get("gates", [])))


# ------------------------------------------------------------------------------------------- registry

# The modules that define the built-in families, each registering its classes on import.
FAMILY_MODULES = (
    "edgegate.nn.attention",
    "edgegate.nn.gating",
    "edgegate.nn.moe",
    "edgegate.nn.early_exit",
    "edgegate.nn.ternary",
    "edgegate.nn.acm",
)

_FAMILIES: dict[type, GateFamily] = {}

# Kinds whose behaviour lives in an edgegate.nn protocol class: a user class must subclass it.
_PROTOCOL_OF = {
    GateKind.EXIT: ("edgegate.nn", "EarlyExitNet", "wrap the stages and heads with edgegate.nn.EarlyExitNet.wrap("
                    "stages, heads, thresholds, policy)"),
    GateKind.ROUTER: ("edgegate.nn", "TopKRouter", "build the block from edgegate.nn.MoE (or register a converter "
                      "with edgegate.convert.register)"),
    GateKind.TERNARY: ("edgegate.nn", "TernaryLinear", "use edgegate.nn.TernaryLinear (or register a converter)"),
    GateKind.LOWRANK: ("edgegate.nn", "HGFLinear", "use edgegate.nn.HGFLinear"),
    GateKind.LEARNERS: ("edgegate.nn", "ACM", "build the block from edgegate.nn.ACM"),
}


def register_family(cls: type, family: GateFamily) -> type:
    """Declare how edgegate treats ``cls`` (and subclasses). Re-declaring a class with another kind is an
    error; the same kind replaces the declaration (a module reloaded, a user adding decision layers)."""
    if not str(family.kind):
        raise EdgegateError(f"register_family: {cls.__qualname__} needs a gate kind (a GateKind or a name)")
    family = replace(family, kind=kind_of(family.kind))
    known = _FAMILIES.get(cls)
    if known is not None and known.kind != family.kind:
        raise EdgegateError(f"register: {cls.__qualname__} is already registered as a {known.kind} gate; "
                            f"it cannot also be a {family.kind} gate")
    _FAMILIES[cls] = family
    return cls


def register(cls: type, kind: GateKind | str, *, decision_layers: DecisionLayers | None = None) -> type:
    """Register a user module class as a gate of ``kind``.

    Early exits, routers, learner counts (ACM), ternary and low-rank layers need edgegate's own protocol
    to be calibrated, exported and measured, so for those kinds ``cls`` must subclass the ``edgegate.nn``
    class (a bare label is refused with what to do instead). Sigmoid, threshold and channel gates are *observed*
    gates: listed in the GateMap, their decision layers (``decision_layers`` here, or a
    ``decision_layers()`` method) kept in float, and their ``last_decision`` (if the module records
    one after each eval forward) compared float vs quantized. The ONNX graph keeps such a gate by name
    only if its forward calls an ``edgegate.ops`` op. ``gate_details() -> dict`` describes it.
    """
    try:
        kind = GateKind(kind)
    except ValueError:
        raise EdgegateError(f"register: unknown gate kind {kind!r}; use one of "
                            f"{', '.join(k.value for k in GateKind)}, or declare a kind of your own with "
                            "register_family and edgegate.calibration.kinds.register_measure") from None
    _ensure_builtins()
    known = family_of_class(cls)
    if known is not None and known.kind != kind:
        raise EdgegateError(f"register: {cls.__qualname__} is already registered as a {known.kind} gate; "
                            f"it cannot also be a {kind} gate")
    if known is not None:
        return cls
    if kind in _PROTOCOL_OF:
        module, name, todo = _PROTOCOL_OF[kind]
        raise EdgegateError(f"register: {cls.__qualname__} does not subclass {module}.{name}, which {kind} gates "
                            f"need to be calibrated and exported (a label alone does nothing): {todo}")
    declared = decision_layers is not None or callable(getattr(cls, "decision_layers", None))
    register_family(cls, GateFamily(kind, Observe.DECISION, decision_layers=decision_layers or _own_decision_layers,
                                    declares_decision_layers=declared, summary="a user gate, observed"))
    return cls


def register_as(kind: GateKind | str) -> Callable[[type], type]:
    """Decorator form of :func:`register`."""
    return lambda cls: register(cls, kind)


def family_of_class(cls: type) -> GateFamily | None:
    """The family of ``cls``'s most specific registered class (an HGFLinear is lowrank, not ternary)."""
    _ensure_builtins()
    for c in cls.__mro__:
        if c in _FAMILIES:
            return _FAMILIES[c]
    return None


def family_of(module: Any) -> GateFamily | None:
    return family_of_class(type(module))


def registered_kind(module: Any) -> GateKind | str | None:
    family = family_of(module)
    return None if family is None else family.kind


def families() -> dict[type, GateFamily]:
    """Every registered family by class (built-ins included), for docs and checks."""
    _ensure_builtins()
    return dict(_FAMILIES)


_BUILTINS_DONE = False


def _ensure_builtins() -> None:
    # Lazy: edgegate.nn imports torch; inspecting a GateMap from a manifest must not.
    global _BUILTINS_DONE
    if _BUILTINS_DONE:
        return
    _BUILTINS_DONE = True
    for name in FAMILY_MODULES:
        importlib.import_module(name)


def find_gates(model: Any) -> GateMap:
    """Every registered gating module of ``model`` (itself included), in ``named_modules`` order.

    A family's ``details`` may name the gate's owner: a router's details come with its MoE's path and
    slot layout (``moe``, ``slot_kinds``...), which calibration uses to find the experts it routes to.
    """
    _ensure_builtins()
    owners: dict[str, dict[str, Any]] = {}  # child path -> details its owner adds (MoE -> router)
    gates = []
    for name, module in model.named_modules():
        own = getattr(module, "gate_owner_details", None)
        if callable(own):
            prefix = f"{name}." if name else ""
            for child, extra in own(name).items():
                owners[f"{prefix}{child}"] = extra
        family = family_of(module)
        if family is None:
            continue
        details = {**family.details(module), **owners.get(name, {})}
        gates.append(GateInfo(name, family.kind, type(module).__name__, details))
    return GateMap(tuple(gates))
