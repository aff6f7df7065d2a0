"""Post-training ternary quantization with an optional fitted low-rank correction.

Stage: quantize. Input: a float model and calibration inputs. Output: a copy whose dense
``nn.Linear`` layers are ``TernaryPTQLinear`` — weights {-1, 0, +1} times one scale, stored 2-bit
packed and run by the ``TernaryMatMul`` op — plus, with ``rank > 0``, a float correction
``g * B(A x)`` (``LowRankCorrection``) fitted to the ternary error W - Q(W) *weighted by the
calibration activations that really reach the layer*, so the rank is spent where the data is.

Fit: with Σ = XᵀX / n (+ a small ridge) and L its Cholesky factor, the rank-r B·A that minimizes
E‖(W − Q(W))x − B·A·x‖² is the truncated SVD of (W − Q(W))·L, mapped back by L⁻¹
(A = V_rᵀ L⁻¹, B = U_r S_r). Models trained with ternary layers (TernaryLinear, HGFLinear) keep
their own weights and correction: they are not converted again.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from edgegate.data import Inputs
from edgegate.ops import pack_ternary, unpack_ternary
from edgegate.ops import torch_ops as ops

RIDGE = 1e-3  # relative to the mean activation energy; keeps Σ invertible for dead inputs


def ternarize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes by BitNet's absmean rule, then the least-squares scale for those codes (never worse)."""
    gamma = w.abs().mean().clamp_min(1e-8)
    codes = (w / gamma).round().clamp(-1, 1)
    nnz = codes.abs().sum()
    scale = (w * codes).sum() / nnz if nnz > 0 else gamma
    return codes, scale.reshape(())


class TernaryPTQLinear(nn.Module):
    """``y = x (s·T)ᵀ + bias [+ g·B(A x)]`` with T ternary, packed 4 weights a byte."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.register_buffer("packed_weight", torch.zeros(out_features, (in_features + 3) // 4, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if rank:
            self.lr_a = nn.Parameter(torch.zeros(rank, in_features))
            self.lr_b = nn.Parameter(torch.zeros(out_features, rank))
            self.g = nn.Parameter(torch.ones(()))

    def get_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "rank": self.rank}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.ternary_matmul(x, self.packed_weight, self.weight_scale, in_features=self.in_features)
        if self.bias is not None:
            y = y + self.bias
        if self.rank:
            y = y + ops.lowrank_correction(x, self.lr_a, self.lr_b, self.g)
        return y

    def dequantized_weight(self) -> torch.Tensor:
        codes = unpack_ternary(self.packed_weight.numpy(), self.in_features)
        return torch.from_numpy(codes.astype(np.float32)) * self.weight_scale


def fit_lowrank(error: torch.Tensor, x: torch.Tensor | None, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, K], B [N, r]) minimizing ‖(error − B·A) xᵀ‖ over the rows of ``x`` (identity weighting if None)."""
    err = error.double()
    k = err.shape[1]
    if x is None or x.shape[0] == 0:
        chol = torch.eye(k, dtype=torch.float64)
    else:
        xs = x.reshape(-1, k).double()
        sigma = xs.T @ xs / xs.shape[0]
        sigma += RIDGE * (sigma.diagonal().mean().clamp_min(1e-12)) * torch.eye(k, dtype=torch.float64)
        chol = torch.linalg.cholesky(sigma)
    u, s, vh = torch.linalg.svd(err @ chol, full_matrices=False)
    r = min(rank, s.numel())
    b = u[:, :r] * s[:r]
    a = torch.linalg.solve_triangular(chol.T, vh[:r].T, upper=True).T  # A = V_rᵀ L⁻¹, i.e. Lᵀ Aᵀ = V_r
    return a.float(), b.float()


def convert_linear(linear: nn.Linear, x: torch.Tensor | None, rank: int) -> TernaryPTQLinear:
    w = linear.weight.detach().float()
    codes, scale = ternarize_weight(w)
    out = TernaryPTQLinear(linear.in_features, linear.out_features, linear.bias is not None, rank)
    with torch.no_grad():
        out.packed_weight.copy_(torch.from_numpy(pack_ternary(codes.to(torch.int8).numpy())))
        out.weight_scale.copy_(scale)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach())
        if rank:
            a, b = fit_lowrank(w - codes * scale, x, rank)
            out.lr_a.copy_(a)
            out.lr_b.copy_(b)
    return out.eval()


@dataclass(frozen=True)
class TernaryReport:
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    kept_float: tuple[str, ...] = ()

    def bits_per_weight(self) -> float:
        """On-disk bits per ternary weight, packed codes and scales included (low-rank factors excluded)."""
        n = sum(v["weights"] for v in self.layers.values())
        bits = sum(v["bytes"] * 8 for v in self.layers.values())
        return bits / n if n else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "kept_float": list(self.kept_float),
                "bits_per_weight": round(self.bits_per_weight(), 4)}


def ternarize_model(model: nn.Module, calib: torch.Tensor | Inputs, keep_float: set[str], rank: int = 0,
                    batch: int = 1024) -> tuple[nn.Module, TernaryReport]:
    """Convert every ``nn.Linear`` not in ``keep_float`` (module paths); the input model is not modified.

    Calibration inputs for each layer are collected under the model's own eval forward, so a layer
    behind a gate (an exit, an expert) is fitted on the activations that actually reach it.
    """
    model = copy.deepcopy(model).eval()
    calib = Inputs.of(calib)
    targets = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and n not in keep_float}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in targets}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
             for n, m in targets.items()] if rank else []
    try:
        with torch.no_grad():
            for i in range(0, len(calib), batch) if rank else ():
                calib[i:i + batch].run(model)
    finally:
        for h in hooks:
            h.remove()
    report_layers = {}
    for name, linear in targets.items():
        x = torch.cat(seen[name]) if seen[name] else None
        new = convert_linear(linear, x, rank)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
        report_layers[name] = {"weights": linear.weight.numel(), "bytes": new.packed_weight.numel() + 4,
                               "rank": rank, "calibration_rows": 0 if x is None else int(x.shape[0])}
    kept = tuple(sorted(n for n, m in model.named_modules() if type(m) is nn.Linear))
    return model, TernaryReport(report_layers, kept)
