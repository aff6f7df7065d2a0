"""Layer-major evaluation of the snn emulator: the step-by-step emulator's spikes and states, computed faster.

Stage: targets (snn), runtime side (numpy; onnxruntime's integer product when it is installed). Input
and output: those of ``edgegate.snn.emulator._simulate_steps``, the literal reading of the spec, which
this module must reproduce bit for bit (tests/unit/test_snn.py compares them).

Why it is exact. There is no synaptic delay, so a layer's spikes over a block of steps depend only on
its source's spikes over the same block and on its own state at the block's start. A block of L steps
is therefore evaluated one layer at a time: one exact integer product ``W @ s`` for all L x B rows
(`edgegate.snn.product`), then the per-step recurrence for i, m, z, which is elementwise. The recurrence
runs in int32 without clipping when a bound proves that no value can leave the int32 range during the
block (then ``sat`` is the identity); otherwise it runs the spec's int64 step.

Early decision. Samples are independent, so a sample's trajectory up to its decision step does not
depend on when the others stop. Every active sample runs the whole block; afterwards the first step
at which its output counts meet the policy is found, its outputs and operation counts are cut there,
and decided samples leave the batch before the next block. With early decision on, blocks start at
``max(min_steps, 8)`` steps and double, so a sample runs at most a block's worth of extra steps
that are computed and thrown away.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from edgegate.snn.emulator import SimResult, _fanout, _init, _State, _step
from edgegate.snn.network import INT32_MAX, NO_DECAY, ExitPolicy, Group, Network
from edgegate.snn.product import IntegerProduct

BLOCK_ELEMENTS = 1 << 23  # rows x widest group per block: bounds the block's temporaries (~100 MB)
FIRST_BLOCK = 8  # steps of the first block when early decision can stop samples
_I32 = 2**31


@dataclasses.dataclass(frozen=True)
class _Params:
    """One group's constants in the forms the block loop uses."""

    theta: np.ndarray  # int64 [n]
    theta32: np.ndarray  # int32 [n]
    enable: np.ndarray | None  # None: every neuron enabled
    k_syn: int
    k_mem: int
    refractory: int
    current_bound: int  # >= |(W @ s) << frac_bits + bias| for any binary s
    product: IntegerProduct | None = None

    @property
    def plain(self) -> bool:
        """No synaptic memory, no membrane leak, no refractory period: the conversion's neuron."""
        return self.k_syn == 0 and self.k_mem == NO_DECAY and self.refractory == 0

    @classmethod
    def of(cls, threshold: np.ndarray, enable: np.ndarray, k_syn: int, k_mem: int, refractory: int,
           current_bound: int, product: IntegerProduct | None = None) -> _Params:
        return cls(threshold.astype(np.int64), threshold.astype(np.int32), None if enable.all() else enable,
                   k_syn, k_mem, refractory, current_bound, product)


def _group_params(g: Group, frac_bits: int, use_ort: bool | None) -> _Params:
    w = g.weight
    # W @ s lies between the sum of a row's negative and the sum of its positive weights
    up, down = np.maximum(w, 0).sum(1, dtype=np.int64), np.minimum(w, 0).sum(1, dtype=np.int64)
    reach = int(np.maximum(up, -down).max(initial=0))
    bound = (reach << frac_bits) + int(np.abs(g.bias.astype(np.int64)).max(initial=0))
    return _Params.of(g.threshold, g.enable, g.k_syn, g.k_mem, g.refractory, bound, IntegerProduct(g.weight, use_ort))


def _currents(g: Group, p: _Params, frac_bits: int, spikes: np.ndarray) -> np.ndarray:
    """``(W @ s) << frac_bits + bias`` for spikes bool [L, B, n_in]: int32 when it provably fits, else int64."""
    length, batch, _ = spikes.shape
    drive = p.product(spikes.reshape(length * batch, -1)).reshape(length, batch, -1)
    if p.current_bound < _I32:
        np.left_shift(drive, frac_bits, out=drive)
        flat = drive.reshape(length, -1)  # a whole [B * n] bias row a step: numpy loops over rows, not neurons
        np.add(flat, np.tile(g.bias, batch), out=flat)
        return drive
    out = drive.astype(np.int64) << frac_bits
    out += g.bias
    return out


def _integrate(st: _State, currents: np.ndarray, p: _Params, membranes: np.ndarray | None) -> np.ndarray:
    """Run one group over a block: currents int [L, B, n] -> spikes bool [L, B, n]; ``st`` advances in place.

    ``membranes`` (int64 [L, B, n]) receives the membrane after each step when given.
    """
    length = currents.shape[0]
    spikes = np.empty(currents.shape, bool)
    # |m| moves by at most |i| + threshold a step: below 2**31 for the whole block, nothing saturates
    fits = p.plain and int(np.abs(st.m).max(initial=0)) + (length + 1) * (p.current_bound + int(p.theta.max())) < _I32
    if fits:
        m, z, reset = st.m.astype(np.int32), st.z, np.empty(st.m.shape, np.int32)
        # whole [B, n] operands: numpy's broadcast of an [n] row costs a loop per sample
        theta = np.ascontiguousarray(np.broadcast_to(p.theta32, m.shape))
        # an int32 membrane never exceeds INT32_MAX: that threshold silences a disabled neuron
        fire_above = theta if p.enable is None else np.where(p.enable, theta, np.int32(INT32_MAX))
        for t in range(length):  # (ufunc where= masks are ~10x slower than these plain passes)
            np.add(m, currents[t], out=m)  # i = sat(current) = current: it fits
            np.multiply(z, theta, out=reset)  # reset by subtraction for last step's spikes
            np.subtract(m, reset, out=m)
            z = spikes[t]
            np.greater(m, fire_above, out=z)
            if membranes is not None:
                membranes[t] = m
        if length:
            st.i, st.m, st.z = currents[-1].astype(np.int64), m.astype(np.int64), z.copy()
        return spikes
    for t in range(length):  # the spec's step, int64 with saturation
        spikes[t] = _step(st, currents[t].astype(np.int64), p.theta, p.enable, p.k_syn, p.k_mem, p.refractory, None)
        if membranes is not None:
            membranes[t] = st.m
    return spikes


def _decisions(counts: np.ndarray, t0: int, exit: ExitPolicy) -> tuple[np.ndarray, np.ndarray]:
    """Per sample of a block starting at step ``t0``: the steps it runs in the block, and whether it decided.

    ``counts`` int64 [L, B, n_out] are the cumulative output spike counts after each step of the block;
    a sample that decides runs up to and including its decision step, the others the whole block.
    """
    length, batch, n = counts.shape
    stop, done = np.full(batch, length, np.int64), np.zeros(batch, bool)
    first = max(exit.min_steps - t0 - 1, 0)  # block-local step t with t0 + t + 1 >= min_steps
    if not exit.enabled or first >= length:
        return stop, done
    c = counts[first:]
    if n > 1:
        top = np.partition(c, n - 2, axis=2)[:, :, -2:]
        lead = top[:, :, 1] - top[:, :, 0]
    else:
        lead = c[:, :, 0]
    ok = lead >= exit.margin
    done = ok.any(0)
    stop[done] = ok.argmax(0)[done] + first + 1
    return stop, done


def _count(spikes: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """Spikes per neuron (int64 [n]) over the block's valid (step, sample) pairs."""
    n = spikes.shape[2]
    if n % 8 and valid is None:  # few neurons: add whole [B, n] planes, the fast axis for numpy
        return spikes.view(np.uint8).sum(0, dtype=np.int32).sum(0, dtype=np.int64)
    rows = (spikes.reshape(-1, n) if valid is None else spikes[valid]).view(np.uint8)
    if n % 8:
        return rows.sum(0, dtype=np.int64)
    # 8 neurons a uint64 word: 255 rows of 0/1 bytes add up without a carry leaving any byte
    whole = rows.shape[0] // 255 * 255
    lanes = rows[:whole].view(np.uint64).reshape(-1, 255, n // 8).sum(1, dtype=np.uint64)
    return lanes.view(np.uint8).sum(0, dtype=np.int64) + rows[whole:].sum(0, dtype=np.int64)


def simulate_layers(net: Network, q: np.ndarray | None, spikes_in: np.ndarray | None, timesteps: int,
                    exit: ExitPolicy, record: bool, use_ort: bool | None = None) -> SimResult:
    """``_simulate_steps`` evaluated block by block and layer by layer (same arguments, same result).

    ``use_ort``: onnxruntime's product for every layer (True), for none (False), or for large ones (None).
    """
    batch = q.shape[0] if q is not None else spikes_in.shape[1]
    e, f, groups = net.encoder, net.frac_bits, net.groups
    names = ["input", *(g.name for g in groups)]
    sizes = [e.neurons, *(g.size for g in groups)]
    params = [_group_params(g, f, use_ort) for g in groups]
    enc = _Params.of(np.full(e.neurons, e.levels, np.int32), np.ones(e.neurons, bool), 0, NO_DECAY, 0, e.levels)
    enc_state = _init(batch, np.full(e.neurons, e.levels // 2, np.int32))
    q_live = None if q is None else q.astype(np.int32)  # q <= levels <= INT32_MAX
    states = [_init(batch, g.v_init) for g in groups]
    fired = [np.zeros(n, np.int64) for n in sizes]
    trains = [np.zeros((timesteps, batch, n), bool) for n in sizes] if record else None
    n_out = sizes[-1]
    counts = np.zeros((batch, n_out), np.int64)
    membrane = np.zeros((batch, n_out), np.int64)
    last_spike = np.zeros((batch, n_out), bool)
    steps = np.full(batch, timesteps, np.int64)
    live = np.arange(batch)  # batch index of each row still running
    live_counts = np.zeros((batch, n_out), np.int64)
    most = max(1, BLOCK_ELEMENTS // max(batch * max(sizes), 1))
    block = min(max(exit.min_steps, FIRST_BLOCK), most) if exit.enabled else most
    t0 = 0
    while t0 < timesteps and live.size:
        length, rows = min(block, timesteps - t0), live.size
        if q_live is not None:
            s = _integrate(enc_state, np.broadcast_to(q_live, (length, *q_live.shape)), enc, None)
        else:
            s = spikes_in[t0:t0 + length] if live.size == batch else spikes_in[t0:t0 + length, live]
        block_spikes = [s]
        membranes = np.empty((length, rows, n_out), np.int64) if exit.enabled else None
        for k, (g, p) in enumerate(zip(groups, params, strict=True)):
            s = _integrate(states[k], _currents(g, p, f, s), p, membranes if k == len(groups) - 1 else None)
            block_spikes.append(s)
        if exit.enabled:
            cumulative = np.cumsum(s, axis=0, dtype=np.int64)
            cumulative += live_counts
            stop, done = _decisions(cumulative, t0, exit)
            block_counts = cumulative[-1]
        else:
            stop, done = np.full(rows, length, np.int64), np.zeros(rows, bool)
            block_counts = live_counts + s.view(np.uint8).sum(0, dtype=np.int64)
        valid = None if stop.min() == length else np.arange(length)[:, None] < stop
        for k, z in enumerate(block_spikes):
            fired[k] += _count(z, valid)
            if record:
                trains[k][t0:t0 + length, live] = z if valid is None else z & valid[:, :, None]
        if done.any():
            at, who = stop[done] - 1, live[done]
            counts[who] = cumulative[at, done]
            membrane[who] = membranes[at, done]
            last_spike[who] = block_spikes[-1][at, done]
            steps[who] = t0 + stop[done]
            keep = ~done
            live, live_counts = live[keep], block_counts[keep]
            for st in (enc_state, *states):
                st.i, st.m, st.z, st.ref = st.i[keep], st.m[keep], st.z[keep], st.ref[keep]
            if q_live is not None:
                q_live = q_live[keep]
        else:
            live_counts = block_counts
        t0 += length
        block = min(2 * block, most)
    counts[live], membrane[live], last_spike[live] = live_counts, states[-1].m, states[-1].z
    fanout = _fanout(groups)
    ran = int(steps.sum())
    return SimResult(
        counts=counts, membrane=membrane, last_spike=last_spike, steps=steps,
        spikes={n: int(c.sum()) for n, c in zip(names, fired, strict=True)},
        synops={g.name: int(fired[k] @ fanout[k]) for k, g in enumerate(groups)},
        neuron_updates={g.name: ran * g.size for g in groups},
        trains={n: tr[:int(steps.max(initial=0))] for n, tr in zip(names, trains, strict=True)} if record else None)
