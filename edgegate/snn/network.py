"""The integer LIF network: what the snn compiler produces and the emulator, core image and NIR read.

Stage: targets (snn). Input: nothing (data only). Output: frozen dataclasses holding integer arrays:
an input encoder, feed-forward neuron groups with their incoming synapses, and the early-decision
policy. The meaning of every field is fixed by :mod:`edgegate.snn.emulator` (the executable spec)
and written out in docs/snn.md. numpy only.
"""

from __future__ import annotations

import dataclasses
from enum import IntEnum
from typing import Any

import numpy as np

from edgegate.errors import TargetError

NO_DECAY = 255  # leak shift meaning "no leak": the decay term is 0 (integrate-and-fire)
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
MAX_SHIFT = 30  # leak shifts 0..30 are arithmetic; NO_DECAY disables the term


class SynapseFormat(IntEnum):
    """How a projection's weights are stored in the core image (the emulator sees int8 either way)."""

    DENSE = 0  # int8 row-major [n_out, n_in]
    TERNARY = 1  # 2-bit codes, 4 a byte LSB first (edgegate.ops.pack_ternary), values in {-1, 0, 1}
    CSR = 2  # int8 values with uint32 row pointers and column indices (sparse, e.g. unrolled convolutions)


@dataclasses.dataclass(frozen=True)
class Encoder:
    """Host-side rate encoder: each input value drives one (or, signed, two) integrate-and-fire neurons.

    Neuron j gets the constant current ``q_j = clip(round(v_j * levels / scale), 0, levels)`` where
    ``v_j`` is ``x_f`` (or ``-x_f`` for the negative half when ``signed``), threshold ``levels`` and
    initial membrane ``levels // 2``; it follows the same equations as every other neuron.
    """

    features: int
    scale: float  # input value that spikes every step
    signed: bool = False
    levels: int = 256

    @property
    def neurons(self) -> int:
        return self.features * (2 if self.signed else 1)


@dataclasses.dataclass(frozen=True)
class Group:
    """A neuron group and the int8 synapses from the previous group (the encoder for the first one).

    States are int32 with ``frac_bits`` fractional bits: a weight ``w`` adds ``w << frac_bits`` to the
    synaptic current; ``bias``, ``threshold`` and ``v_init`` are already in state units.
    """

    name: str
    weight: np.ndarray  # int8 [n_out, n_in]
    bias: np.ndarray  # int32 [n_out], added to the synaptic current every step
    threshold: np.ndarray  # int32 [n_out], > 0
    v_init: np.ndarray  # int32 [n_out], membrane at t = 0
    enable: np.ndarray  # bool [n_out]; a disabled neuron never spikes
    fmt: SynapseFormat = SynapseFormat.DENSE
    k_syn: int = 0  # synaptic-current leak shift (0: the current is this step's input only)
    k_mem: int = NO_DECAY  # membrane leak shift
    refractory: int = 0  # steps a neuron stays silent after a spike
    scale: float = 1.0  # value one spike of this group stands for (threshold balancing), for decoding

    @property
    def size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def fan_in(self) -> int:
        return int(self.weight.shape[1])


@dataclasses.dataclass(frozen=True)
class ExitPolicy:
    """Early decision: stop a sample once its top output spike count leads the runner-up by ``margin``."""

    enabled: bool = False
    margin: int = 4
    min_steps: int = 8


@dataclasses.dataclass(frozen=True)
class Network:
    encoder: Encoder
    groups: tuple[Group, ...]
    frac_bits: int = 8
    timesteps: int = 128
    exit: ExitPolicy = ExitPolicy()
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def output(self) -> Group:
        return self.groups[-1]


def validate(net: Network) -> None:
    """Raise TargetError naming the group and field when the network breaks an invariant of the spec."""
    if not net.groups:
        raise TargetError("snn network has no neuron groups; the model needs at least one Linear layer")
    if not 0 <= net.frac_bits <= 16:
        raise TargetError(f"snn frac_bits={net.frac_bits} must be in 0..16")
    if not 1 <= net.timesteps <= 65535:
        raise TargetError(f"snn timesteps={net.timesteps} must be in 1..65535")
    e = net.encoder
    if e.features < 1 or not 1 <= e.levels <= INT32_MAX or not np.isfinite(e.scale) or e.scale <= 0:
        raise TargetError(f"snn encoder {e} is invalid: needs features >= 1, levels >= 1, scale > 0")
    fan_in = e.neurons
    for g in net.groups:
        n = g.weight.shape[0] if g.weight.ndim == 2 else -1
        if g.weight.dtype != np.int8 or g.weight.ndim != 2 or g.weight.shape[1] != fan_in:
            raise TargetError(f"snn group {g.name}: weight must be int8 [n, {fan_in}], got {g.weight.dtype} "
                              f"{g.weight.shape}")
        for field in ("bias", "threshold", "v_init"):
            a = getattr(g, field)
            if a.dtype != np.int32 or a.shape != (n,):
                raise TargetError(f"snn group {g.name}: {field} must be int32 [{n}], got {a.dtype} {a.shape}")
        if g.enable.dtype != np.bool_ or g.enable.shape != (n,):
            raise TargetError(f"snn group {g.name}: enable must be bool [{n}]")
        if (g.threshold <= 0).any():
            raise TargetError(f"snn group {g.name}: thresholds must be > 0")
        for field in ("k_syn", "k_mem"):
            k = getattr(g, field)
            if not (0 <= k <= MAX_SHIFT or k == NO_DECAY):
                raise TargetError(f"snn group {g.name}: {field}={k} must be 0..{MAX_SHIFT} or {NO_DECAY} (no decay)")
        if not 0 <= g.refractory <= 255:
            raise TargetError(f"snn group {g.name}: refractory={g.refractory} must be 0..255")
        if g.fmt is SynapseFormat.TERNARY and not np.isin(g.weight, (-1, 0, 1)).all():
            raise TargetError(f"snn group {g.name}: ternary synapses must be in {{-1, 0, 1}}")
        if 127 * g.fan_in >= 2**24:
            raise TargetError(f"snn group {g.name}: fan-in {g.fan_in} is too large (max {2**24 // 127})")
        fan_in = n
    if not 0 <= net.exit.margin <= 65535 or not 0 <= net.exit.min_steps <= 65535:
        raise TargetError(f"snn exit policy {net.exit} must have margin and min_steps in 0..65535")
