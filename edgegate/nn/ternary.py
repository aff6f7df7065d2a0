"""Ternary linear layers: BitNet b1.58 ``TernaryLinear`` and Hybrid Gated Flow ``HGFLinear``.

Stage: model family (``edgegate.nn``). Input: ``x`` [..., in_features]. Output: [..., out_features].

BitNet b1.58: weights are absmean-ternarized, ``W_t = clip(round(W / mean|W|), -1, 1) * mean|W|``;
activations are fake-quantized to 8 bits per token (absmax); training uses straight-through
estimators. In eval the layer calls the ``TernaryMatMul`` custom op on the packed 2-bit weights
(4 per byte) and a per-tensor scale, both computed once from the weight and cached as plain tensor
attributes, so ``torch.export`` captures them as constants. The cache is refreshed by ``eval()``,
dropped by ``train()`` / ``load_state_dict`` and checked against the weight's version counter.

A layer converted from a checkpoint that stores its own ternary codes and scale (BitNet's ``BitLinear``)
is built with ``fixed_scale=True`` (:meth:`TernaryLinear.from_codes`): ``weight`` holds codes * scale
and the scale is a buffer, so the codes and scale used are the checkpoint's, never re-derived by absmean.

HGF adds a gated low-rank full-precision correction ``g * B(A x)`` (``LowRankCorrection`` op) with
B zero-initialised, so training starts from the pure ternary layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgegate.errors import ExportError
from edgegate.gates import GateFamily, GateKind, Observe, register_family
from edgegate.nn._record import exporting, record
from edgegate.ops import pack_ternary
from edgegate.ops import torch_ops as ops

ACT_BITS = 8
_QMAX = 2 ** (ACT_BITS - 1) - 1
_EPS = 1e-5


def ternarize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternarization: (codes in {-1, 0, 1} as w's dtype, per-tensor scale mean|W| [0-d])."""
    gamma = w.abs().mean().clamp_min(_EPS)
    return (w / gamma).round().clamp(-1, 1), gamma


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token (last dim) absmax 8-bit fake quantization: round(x * 127 / max|x|) * max|x| / 127."""
    scale = _QMAX / x.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS)
    return (x * scale).round().clamp(-_QMAX - 1, _QMAX) / scale


def _invalidate_after_load(module: TernaryLinear, _incompatible_keys: object) -> None:
    # A module-level function, not a lambda, so modules stay picklable.
    module.invalidate_cache()


class TernaryLinear(nn.Module):
    """BitNet b1.58 linear layer (``last_decision`` stays None: it has no data-dependent gate).

    ``fixed_scale``: the per-tensor scale is the ``weight_scale`` buffer (a checkpoint's own) and the
    codes are ``round(weight / weight_scale)``, instead of absmean ternarization of ``weight``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, fixed_scale: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fixed_scale = in_features, out_features, bool(fixed_scale)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if self.fixed_scale:
            self.register_buffer("weight_scale", torch.ones(()))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's init
        self._packed: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None
        self._cache_key: tuple[int, int] | None = None
        self.last_decision: torch.Tensor | None = None
        self.register_load_state_dict_post_hook(_invalidate_after_load)

    def get_config(self) -> dict[str, Any]:
        config = {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}
        return {**config, "fixed_scale": True} if self.fixed_scale else config

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: float | torch.Tensor,
                   bias: torch.Tensor | None = None) -> TernaryLinear:
        """A layer computing ``x_q @ (codes * scale)^T + bias`` with exactly these codes ({-1, 0, 1},
        [out, in]) and per-tensor scale, in eval mode."""
        codes = codes.detach().float()
        if not torch.isin(codes, torch.tensor([-1.0, 0.0, 1.0], device=codes.device)).all():
            raise ExportError("TernaryLinear.from_codes: codes must be -1, 0 or 1")
        scale = torch.as_tensor(scale, dtype=torch.float32).reshape(())
        if not (torch.isfinite(scale) and scale > 0):
            raise ExportError(f"TernaryLinear.from_codes: the scale must be a positive number, got {float(scale)}")
        layer = cls(codes.shape[1], codes.shape[0], bias=bias is not None, fixed_scale=True)
        with torch.no_grad():
            layer.weight_scale.copy_(scale)
            layer.weight.copy_(codes * scale)
            if bias is not None:
                layer.bias.copy_(bias.detach().float())
        return layer.eval()

    def codes_and_scale(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes in {-1, 0, 1} as w's dtype, per-tensor scale [0-d]) of weight ``w``."""
        if not self.fixed_scale:
            return ternarize(w)
        return (w / self.weight_scale).round().clamp(-1, 1), self.weight_scale

    # ------------------------------------------------------------------ packed-weight cache (eval path)

    def invalidate_cache(self) -> None:
        self._packed = self._scale = self._cache_key = None

    def _key(self) -> tuple[int, ...]:
        if self.fixed_scale:
            return (self.weight._version, self.weight.data_ptr(), self.weight_scale._version)
        return (self.weight._version, self.weight.data_ptr())

    def ternary_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed uint8 [N, ceil(K/4)], per-tensor scale fp32 []) for ``ops.ternary_matmul``."""
        if exporting():
            if self._packed is None:
                raise ExportError(f"{type(self).__name__}: no packed ternary weights; call model.eval() "
                                  "before exporting")
            return self._packed, self._scale
        if self._cache_key != self._key():
            with torch.no_grad():
                codes, gamma = self.codes_and_scale(self.weight.detach())
                packed = pack_ternary(codes.to(torch.int8).cpu().numpy())
                self._packed = torch.from_numpy(packed).to(self.weight.device)
                # BitNet's absmean scale is per tensor: one float for the whole matrix keeps the
                # on-disk cost at 2 bits per weight plus 32 bits per layer.
                self._scale = gamma.float().reshape(()).clone()
            self._cache_key = self._key()
        return self._packed, self._scale

    def train(self, mode: bool = True) -> TernaryLinear:
        super().train(mode)
        if mode:
            self.invalidate_cache()
        elif self.weight.device.type != "meta":
            self.ternary_weights()
        return self

    # --------------------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            # Straight-through estimators: quantized forward, identity gradient.
            xq = x + (quantize_activations(x) - x).detach()
            codes, gamma = self.codes_and_scale(self.weight)
            wq = self.weight + (codes * gamma - self.weight).detach()
            return F.linear(xq, wq, self.bias)
        packed, scale = self.ternary_weights()
        y = ops.ternary_matmul(quantize_activations(x), packed, scale, in_features=self.in_features)
        return y if self.bias is None else y + self.bias


class HGFLinear(TernaryLinear):
    """Hybrid Gated Flow: ternary path + ``g * B(A x)`` on the full-precision input.

    ``A`` [rank, in], ``B`` [out, rank] (zero-initialised), ``g`` a learnable scalar gate.
    ``last_decision`` (eval) = g.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 gate_init: float = 1.0) -> None:
        super().__init__(in_features, out_features, bias)
        self.rank, self.gate_init = rank, gate_init
        self.lr_a = nn.Parameter(torch.randn(rank, in_features) / math.sqrt(in_features))
        self.lr_b = nn.Parameter(torch.zeros(out_features, rank))
        self.g = nn.Parameter(torch.tensor(float(gate_init)))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rank": self.rank, "gate_init": self.gate_init}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x) + ops.lowrank_correction(x, self.lr_a, self.lr_b, self.g)
        if not self.training and not exporting():
            record(self, last_decision=self.g)
        return y


# Ternary layers have no data-dependent decision and no nn.Linear inside: nothing stays float for them.
register_family(TernaryLinear, GateFamily(
    GateKind.TERNARY, Observe.STATIC,
    details=lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                       "scale": "checkpoint" if m.fixed_scale else "absmean"},
    decision_layers=lambda m, info, model: [],
    summary="ternary weights, 2 bits each (TernaryMatMul), per-token 8-bit activations; no decision"))
register_family(HGFLinear, GateFamily(
    GateKind.LOWRANK, Observe.STATIC,
    details=lambda m: {"in_features": m.in_features, "out_features": m.out_features, "rank": m.rank},
    decision_layers=lambda m, info, model: [],
    summary="ternary path + gated low-rank correction (TernaryMatMul + LowRankCorrection)"))
