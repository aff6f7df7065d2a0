"""A NeuroCoreX-style byte stream (``neurocorex.bin``) for networks of at most 90 neurons.

Stage: targets (snn). Input: a `Network`. Output: the bytes a NeuroCoreX-style FPGA core is
programmed with over UART, following the layout of NeuroCoreX's Python interface (96 x 96 int8
matrices, 18-bit parameter words sent as 3 little-endian bytes, 3-byte spike events); it has not
been run on NeuroCoreX hardware here. The stream, in order:

    0x10, lateral (all-to-all) weights int8 [96, 96] row-major [target, source neuron], 0x00
    0x00, feed-forward weights int8 [96, 96] row-major [target neuron, input line], 0x00
    0x20, thresholds 96 words, refractory periods 96 words, membrane leaks 96 words

Device neurons 0.. are the output group (as NeuroCoreX's digits example reads its labels from
neurons 0-9), then the hidden groups in order. Input lines 0.. are the encoder's neurons; a network
with biases gets one more input line, driven every step, whose feed-forward weights are the biases.
NeuroCoreX's state has no fractional bits, so weights stay as compiled and thresholds and biases
are divided by ``2**frac_bits``; disabled neurons get the largest threshold. Only networks without
leaks (``k_syn = 0``, ``k_mem = 255``) map: NeuroCoreX's leak is not the shift of this target.
`spike_events` encodes one sample's input spikes as (dt, input line, 0) triples ended by FF FF FF.
"""

from __future__ import annotations

import numpy as np

from edgegate.errors import TargetError
from edgegate.snn.network import NO_DECAY, Network

SIZE = 96
MAX_NEURONS = 90
WORD_MAX = (1 << 18) - 1
CMD_LATERAL, CMD_FEEDFORWARD, CMD_PARAMS, CMD_SPIKES = 0x10, 0x00, 0x20, 0x30


def _words(values: np.ndarray) -> bytes:
    v = np.asarray(values, np.int64)
    if (v < 0).any() or (v > WORD_MAX).any():
        raise TargetError(f"neurocorex parameter words must be in 0..{WORD_MAX}")
    return np.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], axis=1).astype(np.uint8).tobytes()


def layout(net: Network) -> tuple[list[int], bool]:
    """(first device neuron of each group, whether a bias input line is used); TargetError if it does not fit."""
    total = sum(g.size for g in net.groups)
    if total > MAX_NEURONS:
        raise TargetError(f"neurocorex takes at most {MAX_NEURONS} neurons, the network has {total}; "
                          "compile without -O neurocorex=true or use a smaller model")
    for g in net.groups:
        if g.k_syn != 0 or g.k_mem != NO_DECAY or g.refractory > WORD_MAX:
            raise TargetError(f"neurocorex needs k_syn=0 and k_mem=255 (no leaks); group {g.name} has "
                              f"k_syn={g.k_syn}, k_mem={g.k_mem}")
    biased = any(g.bias.any() for g in net.groups)
    if net.encoder.neurons + int(biased) > SIZE:
        raise TargetError(f"neurocorex takes at most {SIZE} input lines, the network needs "
                          f"{net.encoder.neurons + int(biased)}")
    starts, at = [0] * len(net.groups), net.output.size
    for k in range(len(net.groups) - 1):
        starts[k] = at
        at += net.groups[k].size
    starts[-1] = 0
    return starts, biased


def neurocorex_stream(net: Network) -> bytes:
    """The programming bytes (see module doc)."""
    starts, biased = layout(net)
    shift = net.frac_bits
    lateral = np.zeros((SIZE, SIZE), np.int8)
    feedforward = np.zeros((SIZE, SIZE), np.int8)
    threshold = np.full(SIZE, WORD_MAX, np.int64)
    refractory = np.zeros(SIZE, np.int64)
    bias_line = net.encoder.neurons
    for k, g in enumerate(net.groups):
        rows = slice(starts[k], starts[k] + g.size)
        if k == 0:
            feedforward[rows, :g.fan_in] = g.weight
        else:
            src = starts[k - 1]
            lateral[rows, src:src + g.fan_in] = g.weight
        if biased:
            b = np.rint(g.bias / 2.0**shift)
            if (np.abs(b) > 127).any():
                raise TargetError(f"neurocorex: group {g.name} has biases beyond int8 after the {shift}-bit shift")
            feedforward[rows, bias_line] = b.astype(np.int8)
        theta = np.maximum(np.rint(g.threshold / 2.0**shift), 1).astype(np.int64)
        if (theta > WORD_MAX).any():
            raise TargetError(f"neurocorex: group {g.name} thresholds exceed 18 bits after the {shift}-bit shift")
        threshold[rows] = np.where(g.enable, theta, WORD_MAX)
        refractory[rows] = g.refractory
    return (bytes([CMD_LATERAL]) + lateral.tobytes() + b"\x00"
            + bytes([CMD_FEEDFORWARD]) + feedforward.tobytes() + b"\x00"
            + bytes([CMD_PARAMS]) + _words(threshold) + _words(refractory) + _words(np.zeros(SIZE, np.int64)))


def spike_events(net: Network, spikes: np.ndarray) -> bytes:
    """One sample's input spikes bool [T, encoder neurons] as NeuroCoreX events: 0x30, (dt, line, 0)..., FF FF FF.

    ``dt`` is the number of steps since the previous event (0 within a step); the bias line, when
    the network has biases, fires every step.
    """
    _, biased = layout(net)
    s = np.asarray(spikes, bool)
    if s.ndim != 2 or s.shape[1] != net.encoder.neurons:
        raise TargetError(f"neurocorex spikes must be [T, {net.encoder.neurons}], got {s.shape}")
    if biased:
        s = np.concatenate([s, np.ones((len(s), 1), bool)], axis=1)
    out, last = bytearray([CMD_SPIKES]), 0
    for t, line in zip(*np.nonzero(s), strict=True):
        dt = int(t) - last
        if dt > 254:  # 0xFF starts the end marker
            raise TargetError("neurocorex spike events need gaps of < 255 steps between input spikes")
        out += bytes([dt, int(line), 0])
        last = int(t)
    return bytes(out + b"\xff\xff\xff")
