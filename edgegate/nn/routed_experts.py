"""The routed-experts computation of a MoE block, as one torch op for the sparse export form.

Stage: model family (``edgegate.nn``), used by :class:`edgegate.nn.MoE` while it is exported. Input:
tokens ``x`` [T, d], the dense routing weights ``weights`` [T, E] >= 0 of the FFN experts (the k routed
slots' weights scattered into their columns, 0 elsewhere) and each expert's gated-FFN parameters. Output:
``sum_e weights[:, e] * expert_e(x)`` [T, d], where each expert runs only on the rows whose weight is
non-zero, so a slot set to weight 0 (a skipped expert) costs nothing.

``torch.ops.edgegate.routed_experts`` is what the exporter sees: one call, which the ONNX exporter
writes as one ``edgegate::RoutedExperts`` node (``edgegate.onnx_export.torch_export``) whose inputs are
the parameters' own initializers. That node is a hand-off to the cpu lowering
(``edgegate.onnx_export.passes.lower_moe``: ONNX Runtime's ``QMoE`` kernel, or per-expert gather ->
expert -> scatter-add); it has no function body and no other target receives it (they get the dense
form). The eager implementation below is the same computation in torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import nn


class Activation(StrEnum):
    """The expert's gate activation (SwiGLU with SiLU in Mixtral and most MoE LMs)."""

    SILU = "silu"
    GELU = "gelu"
    GELU_TANH = "gelu_tanh"
    RELU = "relu"


ACTIVATIONS: dict[Activation, Callable[[torch.Tensor], torch.Tensor]] = {
    Activation.SILU: F.silu,
    Activation.GELU: F.gelu,
    Activation.GELU_TANH: lambda x: F.gelu(x, approximate="tanh"),
    Activation.RELU: F.relu,
}


class MoEForm(StrEnum):
    """How a MoE block is written into an exported graph."""

    DENSE = "dense"  # every expert on every token, then the routed ones gathered (static shapes; trt)
    SPARSE = "sparse"  # one RoutedExperts op that only computes routed tokens (lowered for cpu)


PER_EXPERT = ("w1", "w3", "w2")  # the parameter order of one expert in ``params`` (weights, then biases)


@torch.library.custom_op("edgegate::routed_experts", mutates_args=(),
                         schema="(Tensor x, Tensor weights, Tensor[] params, str act, bool bias, int k) -> Tensor")
def _routed_experts(x: torch.Tensor, weights: torch.Tensor, params: Sequence[torch.Tensor], act: str,
                    bias: bool, k: int) -> torch.Tensor:
    per = 6 if bias else 3
    y = torch.zeros_like(x)
    fn = ACTIVATIONS[Activation(act)]
    for e in range(weights.shape[1]):
        p = params[e * per:(e + 1) * per]
        w1, w3, w2 = p[:3]
        b1, b3, b2 = p[3:] if bias else (None, None, None)
        rows = torch.nonzero(weights[:, e]).reshape(-1)
        if rows.numel():
            xe = x[rows]
            h = fn(F.linear(xe, w1, b1)) * F.linear(xe, w3, b3)
            y.index_add_(0, rows, weights[rows, e].unsqueeze(-1).to(x.dtype) * F.linear(h, w2, b2))
    return y


@_routed_experts.register_fake
def _(x: torch.Tensor, weights: torch.Tensor, params: Sequence[torch.Tensor], act: str, bias: bool,
      k: int) -> torch.Tensor:
    return torch.empty_like(x)


def expert_params(experts: Sequence[nn.Module]) -> list[torch.Tensor] | None:
    """The experts' parameters in the op's order (per expert: w1, w3, w2 weights, then their biases), or
    None when an expert's projections are not plain ``nn.Linear`` (e.g. ternary after PTQ): the sparse form
    then does not apply and the block exports dense."""
    params: list[torch.Tensor] = []
    for e in experts:
        layers = [getattr(e, n, None) for n in PER_EXPERT]
        if not all(type(m) is nn.Linear for m in layers):
            return None
        params += [m.weight for m in layers]
        if layers[0].bias is not None:
            if not all(m.bias is not None for m in layers):
                return None
            params += [m.bias for m in layers]
    return params


def routed_experts(x: torch.Tensor, weights: torch.Tensor, params: Sequence[torch.Tensor], act: Activation | str,
                   bias: bool, k: int) -> torch.Tensor:
    """``sum_e weights[:, e] * expert_e(x)``, each expert on its rows of non-zero weight (see the module doc);
    ``k``: at most that many non-zero weights in a row (the router's k), recorded for the lowering."""
    return torch.ops.edgegate.routed_experts(x, weights.to(x.dtype), list(params), str(Activation(act)), bool(bias),
                                             int(k))
