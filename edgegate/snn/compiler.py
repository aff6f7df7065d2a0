"""Compile a float/int8/ternary Linear chain into an integer LIF `Network` by threshold balancing.

Stage: targets (snn), compile side. Input: a `Chain` (edgegate.snn.graph) and representative inputs.
Output: a `Network`. A spike of layer l stands for the value ``lambda_l``: the 99.9th percentile of
that layer's activations on the calibration inputs (Rueckauer et al. 2017, robust normalization;
``lambda_0`` for the input, from its absolute values). A layer ``y = act(W x + b)`` then needs, per
output neuron i, a unit ``u_i = max_j |W_ij| * lambda_{l-1} / w_max`` (w_max = 127, or 1 for ternary
layers, which keep their {-1, 0, 1} codes): int8 weights ``round(W_ij * lambda_{l-1} / u_i)``,
threshold ``round(lambda_l / u_i * 2**frac_bits)``, bias ``round(b_i / u_i * 2**frac_bits)`` (a
constant input current every step), and ``v_init = threshold // 2``. A neuron firing at rate r
then encodes ``r * lambda_l``: ReLU comes from spikes being non-negative, reset by subtraction keeps
the remainder. ``ThresholdGate`` gains are folded into the weights and bias (gain > 0); its
threshold ``h > tau`` becomes the ReLU, and neurons whose gate never opens on the calibration
inputs (or whose gain is <= 0) get their enable bit cleared. Signed inputs use two encoder neurons
per feature (x+ and x-, weights W and -W).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from edgegate.errors import TargetError
from edgegate.snn.graph import Chain, FloatLayer
from edgegate.snn.network import INT32_MAX, NO_DECAY, Encoder, ExitPolicy, Group, Network, SynapseFormat

log = logging.getLogger(__name__)

CSR_DENSITY = 0.25  # store a projection as CSR below this fraction of non-zero weights


@dataclasses.dataclass(frozen=True)
class BalanceConfig:
    timesteps: int = 128
    frac_bits: int = 8
    percentile: float = 99.9
    k_syn: int = 0
    k_mem: int = NO_DECAY
    refractory: int = 0
    exit: ExitPolicy = ExitPolicy()


def _percentile(a: np.ndarray, p: float) -> float:
    a = np.asarray(a, np.float64).reshape(-1)
    v = float(np.percentile(a, p)) if a.size else 0.0
    if not v > 0:  # a layer that is (nearly) always off: fall back to its max, then to 1
        v = float(a.max()) if a.size and a.max() > 0 else 1.0
    return v


def compile_network(chain: Chain, calibration: np.ndarray, config: BalanceConfig) -> Network:
    """Threshold-balance ``chain`` on ``calibration`` [N, ...] into an integer `Network`."""
    if chain.issues:
        i = chain.issues[0]
        raise TargetError(f"snn cannot compile node {i.node} ({i.op_type}): {i.message}; {i.hint}")
    x = np.asarray(calibration, np.float64).reshape(len(calibration), -1)
    if len(x) == 0 or not np.isfinite(x).all():
        raise TargetError("snn threshold balancing needs finite calibration inputs; pass --calib")
    features = chain.layers[0].weight.shape[1]
    if x.shape[1] != features:
        raise TargetError(f"snn calibration inputs have {x.shape[1]} features, the first layer takes {features}")
    signed = bool((x < 0).any())
    lam_in = float(np.float32(_percentile(np.abs(x), config.percentile)))  # the image stores it as f32
    encoder = Encoder(features=features, scale=lam_in, signed=signed)
    acts = chain.forward(x)
    groups, lambdas, disabled = [], [lam_in], {}
    for k, (layer, a) in enumerate(zip(chain.layers, acts, strict=True)):
        last = k == len(chain.layers) - 1
        lam_out = _percentile(np.maximum(a, 0.0), config.percentile)
        h = None
        if layer.act == "gate":  # the pre-gate values decide which neurons ever open
            prev = acts[k - 1] if k else x
            h = FloatLayer(layer.name, layer.weight, layer.bias, input_quant=layer.input_quant).forward(prev)
        group = _balance(layer, lam_in, lam_out, signed and k == 0, h, config, last)
        disabled[group.name] = int((~group.enable).sum())
        groups.append(group)
        lambdas.append(lam_out)
        lam_in = lam_out
    meta = {"percentile": config.percentile, "lambdas": lambdas, "layers": [g.name for g in groups],
            "exits": chain.exits, "disabled_neurons": disabled}
    return Network(encoder=encoder, groups=tuple(groups), frac_bits=config.frac_bits, timesteps=config.timesteps,
                   exit=config.exit, meta=meta)


def _balance(layer: FloatLayer, lam_in: float, lam_out: float, signed_input: bool, h: np.ndarray | None,
             config: BalanceConfig, last: bool) -> Group:
    w, b = layer.weight, layer.bias
    n_out = w.shape[0]
    enable = np.ones(n_out, bool)
    gain = np.ones(n_out)
    if layer.act == "gate":
        gain = np.asarray(layer.gain, np.float64)
        opened = (h > layer.tau).any(axis=0)
        enable = (gain > 0) & opened
        gain = np.where(gain > 0, gain, 1.0)
    ternary = layer.ternary is not None
    if ternary:
        codes = layer.ternary.astype(np.int8)
        unit = np.abs(layer.ternary_scale * gain) * lam_in
        wmax = 1
    else:
        v = w * gain[:, None] * lam_in
        wmax = 127
        rowmax = np.abs(v).max(axis=1)
        fallback = rowmax.max() if rowmax.max() > 0 else lam_out
        unit = np.where(rowmax > 0, rowmax, fallback) / wmax
        codes = np.clip(np.rint(v / unit[:, None]), -127, 127).astype(np.int8)
    unit = np.where(unit > 0, unit, lam_out)
    if signed_input:
        codes = np.concatenate([codes, -codes], axis=1)
    one = float(2**config.frac_bits)
    threshold = np.clip(np.rint(lam_out / unit * one), 1, INT32_MAX)
    bias = np.clip(np.rint(b * gain / unit * one), -INT32_MAX, INT32_MAX)
    if (threshold >= INT32_MAX).any():
        log.warning("snn layer %s: thresholds saturate int32; lower frac_bits", layer.name)
    density = np.count_nonzero(codes) / max(codes.size, 1)
    fmt = SynapseFormat.TERNARY if ternary else SynapseFormat.CSR if density < CSR_DENSITY else SynapseFormat.DENSE
    threshold = threshold.astype(np.int32)
    return Group(name=layer.name, weight=codes, bias=bias.astype(np.int32), threshold=threshold,
                 v_init=(threshold // 2).astype(np.int32), enable=enable, fmt=fmt, k_syn=config.k_syn,
                 k_mem=config.k_mem, refractory=config.refractory, scale=lam_out)
