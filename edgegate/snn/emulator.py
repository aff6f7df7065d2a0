"""The snn target's cycle-accurate emulator: the executable definition of the neuron model.

Stage: targets (snn), runtime side (numpy; onnxruntime's integer product when installed, see
edgegate.snn.product). Input: a `Network` and either real-valued inputs [B, features] (rate-encoded
here, `run`) or input spike trains [T, B, neurons] (`simulate`). Output:
a `SimResult`: output spike counts and membranes, timesteps run per sample, and the operation counts
the energy estimate is built from. Every step, for each group in order (the encoder first, then
each layer, which sees the spikes its source group emitted in the same step):

    i <- sat(i - rnd(i, k_syn) + (W @ s) << frac_bits + bias)      synaptic current
    m <- sat(m - rnd(m, k_mem) + i - z_prev * threshold)            membrane, reset by subtraction
    z <- (m > threshold) and enable and (refractory counter == 0)

with ``rnd(x, k) = (x + 2**(k-1)) >> k`` (arithmetic shift, half rounds up), ``rnd(x, 0) = x``,
``rnd(x, NO_DECAY) = 0``, and ``sat`` clipping to int32. A refractory counter is set to
``refractory`` on a spike and counts down by one per step; the membrane keeps integrating meanwhile.
All arithmetic is exact integer arithmetic (W @ s runs in float32 BLAS, exact below 2**24, which
`validate` guarantees). Samples of a batch are independent: batching never changes a result.

`run` and `simulate` compute by default with edgegate.snn.layered (whole layers over blocks of steps,
several times faster); ``method="steps"`` runs `_simulate_steps` below, the step-by-step loop that is
the spec, and which the layered evaluation is tested against bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import numpy as np

from edgegate.errors import TargetError
from edgegate.snn.network import INT32_MAX, INT32_MIN, NO_DECAY, ExitPolicy, Group, Network


@dataclasses.dataclass(frozen=True)
class SimResult:
    """One simulated batch. Counts are summed over the samples and the steps each sample ran."""

    counts: np.ndarray  # int64 [B, n_out] output spikes
    membrane: np.ndarray  # int64 [B, n_out] output membranes after the last step a sample ran
    last_spike: np.ndarray  # bool [B, n_out] output spikes of that last step (reset not yet applied)
    steps: np.ndarray  # int64 [B] timesteps run (< T where the early decision stopped a sample)
    spikes: dict[str, int]  # group name -> spikes ("input" = the encoder's or the given spike trains)
    synops: dict[str, int]  # group name -> synaptic events delivered into it (source spikes x fan-out)
    neuron_updates: dict[str, int]  # group name -> neuron state updates (samples x steps x neurons)
    trains: dict[str, np.ndarray] | None = None  # group name -> bool [T, B, n] when recorded


@dataclasses.dataclass
class _State:
    i: np.ndarray
    m: np.ndarray
    z: np.ndarray
    ref: np.ndarray


def rnd_shift(x: np.ndarray, k: int) -> np.ndarray:
    """The leak term ``rnd(x, k)`` of the spec (int64 in, int64 out)."""
    if k == NO_DECAY:
        return np.zeros_like(x)
    if k == 0:
        return x
    return (x + (1 << (k - 1))) >> k


_LO, _HI = np.int64(INT32_MIN), np.int64(INT32_MAX)


def _sat(x: np.ndarray) -> np.ndarray:
    np.maximum(x, _LO, out=x)
    return np.minimum(x, _HI, out=x)


def _init(batch: int, v_init: np.ndarray) -> _State:
    n = v_init.shape[0]
    z = np.zeros((batch, n), dtype=bool)
    return _State(np.zeros((batch, n), np.int64), np.broadcast_to(v_init.astype(np.int64), (batch, n)).copy(),
                  z, np.zeros((batch, n), np.int64))


def _step(st: _State, drive: np.ndarray, threshold: np.ndarray, enable: np.ndarray | None, k_syn: int, k_mem: int,
          refractory: int, active: np.ndarray | None) -> np.ndarray:
    """Advance one group by one step in place (only ``active`` rows when given); returns the new spikes.

    ``enable`` None means every neuron is enabled. Terms that are zero by the group's constants
    (no leak, no refractory period) are skipped: the arithmetic is the spec's either way.
    """
    # k_syn = 0: i - rnd(i, 0) = 0, the current is this step's drive alone
    i = _sat(drive.copy() if k_syn == 0 else st.i - rnd_shift(st.i, k_syn) + drive)
    m = st.m + i if k_mem == NO_DECAY else st.m - rnd_shift(st.m, k_mem) + i
    m -= st.z * threshold
    _sat(m)
    z = m > threshold
    if enable is not None:
        z &= enable
    if refractory:
        z &= st.ref == 0
        ref = np.where(z, refractory, np.maximum(st.ref - 1, 0))
    else:
        ref = st.ref
    if active is None:
        st.i, st.m, st.z, st.ref = i, m, z, ref
        return z
    a = active[:, None]
    st.i, st.m = np.where(a, i, st.i), np.where(a, m, st.m)
    st.z, st.ref = np.where(a, z, st.z), np.where(a, ref, st.ref)
    return st.z & a


def encode(net: Network, x: np.ndarray) -> np.ndarray:
    """The encoder's constant input currents q [B, neurons] (int64) for real-valued inputs x [B, ...]."""
    e = net.encoder
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    if x.shape[1] != e.features:
        raise TargetError(f"snn input has {x.shape[1]} features per sample, the network takes {e.features}")
    if not np.isfinite(x).all():
        raise TargetError("snn input has NaN or infinite values; clean the input")
    v = np.concatenate([x, -x], axis=1) if e.signed else x
    return np.clip(np.rint(v * (e.levels / e.scale)), 0, e.levels).astype(np.int64)


METHODS = ("layers", "steps")


def run(net: Network, x: np.ndarray, timesteps: int | None = None, *, exit: ExitPolicy | None = None,
        record: bool = False, method: str = "layers") -> SimResult:
    """Encode ``x`` [B, features] with the network's encoder and simulate ``timesteps`` steps.

    ``method`` "steps" runs this module's step-by-step loop, the literal reading of the spec; "layers"
    (edgegate.snn.layered) computes the same result, bit for bit, layer by layer over blocks of steps.
    """
    return _simulate(net, encode(net, x), None, timesteps or net.timesteps, exit, record, method)


def simulate(net: Network, spikes_in: np.ndarray, timesteps: int | None = None, *,
             exit: ExitPolicy | None = None, record: bool = False, method: str = "layers") -> SimResult:
    """Simulate with given input spike trains ``spikes_in`` bool [T, B, n_in] (T >= ``timesteps``).

    The standalone core step: no encoder runs; group 0 sees ``spikes_in[t]`` at step t. ``exit``
    defaults to no early decision (pass ``net.exit`` for the compiled policy). ``method`` as in `run`.
    """
    s = np.asarray(spikes_in)
    if s.ndim != 3 or s.shape[2] != net.encoder.neurons:
        raise TargetError(f"snn spikes_in must be [T, B, {net.encoder.neurons}], got {s.shape}")
    t = timesteps or s.shape[0]
    if t > s.shape[0]:
        raise TargetError(f"snn spikes_in has {s.shape[0]} steps, {t} requested")
    return _simulate(net, None, s.astype(bool), t, exit, record, method)


def _fanout(groups: tuple[Group, ...]) -> list[np.ndarray]:
    """Per source neuron: synapses to enabled neurons of the next group (the encoder is source 0)."""
    return [np.count_nonzero(g.weight[g.enable], axis=0).astype(np.int64) for g in groups]


@functools.cache
def _blas_controller():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional: the runtime side needs numpy alone
        return None
    return ThreadpoolController()


def _one_blas_thread():
    """One BLAS thread: the per-step products are small, and threads only contend on a busy host (10x slower
    on 2 shared cores); the layer-major products are large but run single-threaded too, like the peer."""
    controller = _blas_controller()
    return contextlib.nullcontext() if controller is None else controller.limit(limits=1, user_api="blas")


def _simulate(net: Network, q: np.ndarray | None, spikes_in: np.ndarray | None, timesteps: int,
              exit: ExitPolicy | None, record: bool, method: str) -> SimResult:
    if method not in METHODS:
        raise TargetError(f"snn emulator method {method!r} must be one of {', '.join(METHODS)}")
    if not 1 <= timesteps <= 65535:
        raise TargetError(f"snn timesteps={timesteps} must be in 1..65535")
    exit = exit or ExitPolicy()
    with _one_blas_thread():
        if method == "steps":
            return _simulate_steps(net, q, spikes_in, timesteps, exit, record)
        from edgegate.snn.layered import simulate_layers  # layered builds on this module's kernels

        return simulate_layers(net, q, spikes_in, timesteps, exit, record)


def _simulate_steps(net: Network, q: np.ndarray | None, spikes_in: np.ndarray | None, timesteps: int,
                    exit: ExitPolicy, record: bool) -> SimResult:
    batch = q.shape[0] if q is not None else spikes_in.shape[1]
    e, f = net.encoder, net.frac_bits
    enc = _init(batch, np.full(e.neurons, e.levels // 2, np.int32))
    enc_theta = np.int64(e.levels)
    states = [_init(batch, g.v_init) for g in net.groups]
    weights_t = [g.weight.T.astype(np.float32) for g in net.groups]
    thetas = [g.threshold.astype(np.int64) for g in net.groups]
    biases = [g.bias.astype(np.int64) for g in net.groups]
    enables = [None if g.enable.all() else g.enable for g in net.groups]
    names = ["input", *(g.name for g in net.groups)]
    fired = [np.zeros((batch, n), np.int64) for n in (e.neurons, *(g.size for g in net.groups))]
    trains = {n: [] for n in names} if record else None
    counts = fired[-1]  # the output group's spikes per sample and neuron
    steps = np.full(batch, timesteps, np.int64)
    active = np.ones(batch, bool) if exit.enabled else None
    updates = 0
    for t in range(timesteps):
        if q is not None:
            s = _step(enc, q, enc_theta, None, 0, NO_DECAY, 0, active)
        else:
            s = spikes_in[t] if active is None else spikes_in[t] & active[:, None]
        fired[0] += s
        if record:
            trains["input"].append(s)
        for k, (g, st) in enumerate(zip(net.groups, states, strict=True)):
            drive = (s.astype(np.float32) @ weights_t[k]).astype(np.int64) << f
            drive += biases[k]
            s = _step(st, drive, thetas[k], enables[k], g.k_syn, g.k_mem, g.refractory, active)
            fired[k + 1] += s
            if record:
                trains[g.name].append(s)
        updates += batch if active is None else int(active.sum())
        if active is not None and t + 1 >= exit.min_steps:
            top = np.partition(counts, counts.shape[1] - 2, axis=1)[:, -2:] if counts.shape[1] > 1 else \
                np.concatenate([np.zeros((batch, 1), np.int64), counts], axis=1)
            done = active & (top[:, 1] - top[:, 0] >= exit.margin)
            steps[done] = t + 1
            active &= ~done
            if not active.any():
                break
    fanout = _fanout(net.groups)
    spikes = {n: int(c.sum()) for n, c in zip(names, fired, strict=True)}
    synops = {g.name: int(fired[k].sum(0) @ fanout[k]) for k, g in enumerate(net.groups)}
    neuron_updates = {g.name: updates * g.size for g in net.groups}
    out = states[-1]
    return SimResult(counts=counts, membrane=out.m, last_spike=out.z, steps=steps, spikes=spikes, synops=synops,
                     neuron_updates=neuron_updates,
                     trains={n: np.stack(v) for n, v in trains.items()} if record else None)


def decode(net: Network, result: SimResult) -> np.ndarray:
    """Output values float32 [B, n_out]: spike count plus residual membrane, in the source's units.

    ``(count + (m - v_init - z_last * threshold) / threshold) * scale / steps`` -- for a non-leaky
    output group this is the mean input current over the run divided by the threshold, i.e. the
    source layer's output estimated from the spike rates that reach it (negative values included).
    """
    g = net.output
    theta = g.threshold.astype(np.float64)
    residual = (result.membrane - g.v_init - result.last_spike * g.threshold.astype(np.int64)) / theta
    value = (result.counts + residual) * g.scale / result.steps[:, None]
    return value.astype(np.float32)
