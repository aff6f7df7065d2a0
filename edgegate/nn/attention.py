"""Gated attention (Qwen "Gated Attention for LLMs"): a sigmoid gate on the SDPA output.

Stage: model family (``edgegate.nn``). Input: hidden states ``x`` [B, T, d_model]. Output: the
attention output [B, T, d_model]. The gate logits are a projection of the same input the query is
computed from (per head, or per element of each head) and multiply the SDPA output before the
output projection, through the ``SigmoidGate`` custom op, so the exported graph keeps the gate by name.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgegate.errors import EdgegateError
from edgegate.gates import GateFamily, GateKind, Observe, register_family
from edgegate.nn._record import exporting, record
from edgegate.ops import torch_ops as ops

GATE_MODES = ("headwise", "elementwise")


class GatedAttention(nn.Module):
    """Multi-head self-attention with an output gate ``sigmoid(x W_g)`` applied after SDPA.

    ``gate="headwise"``: one gate scalar per head and token; ``"elementwise"``: one per channel.
    ``last_decision`` (eval): the gate values ``sigmoid(logits)`` shaped like the broadcast gate,
    [B, H, T, 1] (headwise) or [B, H, T, head_dim] (elementwise).
    """

    def __init__(self, d_model: int, n_heads: int, gate: str = "headwise", bias: bool = True) -> None:
        super().__init__()
        if d_model % n_heads:
            raise EdgegateError(f"GatedAttention: d_model={d_model} is not divisible by n_heads={n_heads}")
        if gate not in GATE_MODES:
            raise EdgegateError(f"GatedAttention: gate={gate!r} is unknown; use one of {GATE_MODES}")
        self.d_model, self.n_heads, self.gate, self.bias = d_model, n_heads, gate, bias
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)
        self.gate_proj = nn.Linear(d_model, n_heads if gate == "headwise" else d_model, bias=bias)
        self.last_decision: torch.Tensor | None = None

    def get_config(self) -> dict[str, Any]:
        return {"d_model": self.d_model, "n_heads": self.n_heads, "gate": self.gate, "bias": self.bias}

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.n_heads, -1).transpose(1, 2)  # [B, H, T, head_dim]

    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Gate logits broadcastable to the SDPA output [B, H, T, head_dim]."""
        return self._heads(self.gate_proj(x))  # headwise: [B, H, T, 1]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        g = self.gate_logits(x)
        # The same op in training and inference: ops runs its differentiable body when grads are needed.
        y = ops.sigmoid_gate(attn, g)
        if not self.training and not exporting():
            record(self, last_decision=torch.sigmoid(g))
        return self.o_proj(y.transpose(1, 2).reshape(b, n, self.d_model))


register_family(GatedAttention, GateFamily(
    GateKind.SIGMOID, Observe.DECISION,
    details=lambda m: {"n_heads": m.n_heads, "mode": m.gate, "d_model": m.d_model},
    decision_layers=lambda m, info, model: [(m.gate_proj, "attention gate projection")],
    summary="sigmoid gate on the attention output (SigmoidGate); gate_proj stays float"))
