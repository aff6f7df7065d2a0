"""Converter family: Qwen3-Next's sigmoid-gated attention output -> a ``SigmoidGate`` op (gate kind sigmoid),
and its gated delta-net layers -> an export form that exports in seconds.

Stage: convert (DESIGN §10). Input: a ``transformers`` ``Qwen3NextAttention``, which computes the query
and a per-channel gate with one projection (``q_proj`` rows interleaved per head: head_dim query rows,
then head_dim gate rows) and multiplies the attention output by ``sigmoid(gate)`` before ``o_proj``.
Output: :class:`GatedAttentionOutput`, the same attention with ``q_proj`` split into ``q_proj`` (query
rows) and ``gate_proj`` (gate rows) — the same dot products, so weight-preserving — and the gate applied
through ``ops.sigmoid_gate``: the exported graph has one ``SigmoidGate`` per attention layer, the gate
projection is a decision layer kept in float by the gate precision policy, and ``last_decision``
holds the gate values for fidelity. The forward is Qwen3-Next's own (q/k RMSNorm, rotary embedding,
the model's attention implementation, the cache when one is given), read from the original module's
code module, so nothing here imports ``transformers``.

``Qwen3NextGatedDeltaNet`` (linear attention; no gate of ours) becomes :class:`DeltaNetExportForm`
(``edgegate.convert.delta_rule``): the same weights and arithmetic, but the chunk's triangular system
is inverted with log2(chunk) matrix products instead of transformers' export path, a Python loop over
the 64 rows of a chunk that the exporter unrolls into thousands of nodes per layer (110–170 s, or more,
to export a tiny model).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from edgegate.convert.delta_rule import DeltaNetExportForm
from edgegate.convert.registry import register
from edgegate.gates import GateFamily, GateKind, Observe, register_family
from edgegate.nn._record import exporting, record
from edgegate.ops import torch_ops as ops


class GatedAttentionOutput(nn.Module):
    """Attention whose output is gated per channel by ``sigmoid(gate_proj(x))`` (Qwen3-Next full attention).

    ``last_decision`` (eval): the gate values [B, T, heads * head_dim].
    """

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        code = sys.modules[type(source).__module__]  # the transformers modeling module the source came from
        self._rotary = code.apply_rotary_pos_emb
        self._eager = code.eager_attention_forward
        self._interfaces = code.ALL_ATTENTION_FUNCTIONS
        # What the attention implementations read off the module.
        self.config, self.layer_idx = source.config, source.layer_idx
        self.head_dim, self.num_key_value_groups = source.head_dim, source.num_key_value_groups
        self.scaling, self.attention_dropout, self.is_causal = source.scaling, source.attention_dropout, True
        heads = source.q_proj.out_features // (2 * self.head_dim)
        self.n_heads = heads
        self.q_proj, self.gate_proj = _split_interleaved(source.q_proj, heads, self.head_dim)
        self.k_proj, self.v_proj, self.o_proj = source.k_proj, source.v_proj, source.o_proj
        self.q_norm, self.k_norm = source.q_norm, source.k_norm
        self.last_decision: torch.Tensor | None = None
        self.train(source.training)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, cache: Any = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        key = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = self._rotary(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attention = self._interfaces.get_interface(self.config._attn_implementation, self._eager)
        out, weights = attention(self, query, key, value, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                                 **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        gate = self.gate_proj(hidden_states)
        if not self.training and not exporting():
            record(self, last_decision=torch.sigmoid(gate))
        return self.o_proj(ops.sigmoid_gate(out, gate)), weights


def _split_interleaved(proj: nn.Linear, heads: int, head_dim: int) -> tuple[nn.Linear, nn.Linear]:
    """``proj``'s rows per head are [query (head_dim), gate (head_dim)]: two Linears with those rows."""
    weight = proj.weight.detach().reshape(heads, 2, head_dim, proj.in_features)
    bias = None if proj.bias is None else proj.bias.detach().reshape(heads, 2, head_dim)
    parts = []
    for i in range(2):
        lin = nn.Linear(proj.in_features, heads * head_dim, bias=bias is not None, device=weight.device,
                        dtype=weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(weight[:, i].reshape(heads * head_dim, proj.in_features))
            if bias is not None:
                lin.bias.copy_(bias[:, i].reshape(-1))
        parts.append(lin)
    return parts[0], parts[1]


def convert_attention(source: nn.Module) -> tuple[nn.Module, str]:
    return GatedAttentionOutput(source), str(GateKind.SIGMOID)


register_family(GatedAttentionOutput, GateFamily(
    GateKind.SIGMOID, Observe.DECISION,
    details=lambda m: {"n_heads": m.n_heads, "mode": "elementwise", "head_dim": m.head_dim},
    decision_layers=lambda m, info, model: [(m.gate_proj, "attention output gate projection")],
    summary="Qwen3-Next attention output x sigmoid(gate) per channel (SigmoidGate); gate_proj stays float"))

register("transformers.models.qwen3_next.modeling_qwen3_next:Qwen3NextAttention", convert_attention,
         family=str(GateKind.SIGMOID), architecture="Qwen3-Next",
         becomes="GatedAttentionOutput: q_proj split into query and gate projections, SigmoidGate op",
         notes="the gate projection stays float (gate precision policy)")

register("transformers.models.qwen3_next.modeling_qwen3_next:Qwen3NextGatedDeltaNet", DeltaNetExportForm.convert,
         architecture="Qwen3-Next", becomes="DeltaNetExportForm: the same layer, compact to export (no gate)",
         notes="log2(chunk) matrix products invert the chunk's triangular system instead of a 63-step loop")
