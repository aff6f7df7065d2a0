"""An export form of Qwen3-Next's gated delta-net layer (linear attention with a gated delta rule).

Stage: convert (DESIGN §10). Input: a ``transformers`` ``Qwen3NextGatedDeltaNet``. Output:
:class:`DeltaNetExportForm`, which keeps the layer (its projections, convolution, norm and weights are
the original's submodules) and computes its cache-free forward with :func:`chunk_gated_delta_rule`.

Why: within a chunk of C tokens the delta rule solves the unit lower-triangular system
``(I + A) X = B`` (A strictly lower triangular). Eager transformers calls ``solve_triangular``, which
ONNX has no operator for; under export it builds the inverse row by row, a Python loop of C-1 steps
that the exporter unrolls (thousands of nodes per layer; minutes to export even a tiny model). Here
the inverse is the finite Neumann series of the nilpotent ``N = -A``, evaluated as a product of
``ceil(log2 C)`` factors: ``(I - N)^-1 = (I + N)(I + N^2)(I + N^4)...``, exact because ``N^C = 0``.
The chunk is the sequence length rounded up to a power of two (at most 64): the chunked delta rule
gives the same result for any chunk size, and a short sequence then needs one chunk, no padding.
With a cache (step-by-step decoding) the original forward runs unchanged.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MAX_CHUNK = 64  # transformers' chunk size


def unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """``(I + tril(a, -1))^-1`` for square matrices in the last two dims, by log2(n) matrix products."""
    n = a.shape[-1]
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    power = -a.tril(-1)
    inverse = eye + power
    for _ in range(max(0, math.ceil(math.log2(n)) - 1)):
        power = power @ power
        inverse = inverse + inverse @ power  # inverse @ (I + power): the next 2^j terms of the series
    return inverse


def chunk_gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor) -> torch.Tensor:
    """The gated delta rule over a whole sequence from a zero state, chunked (no cache).

    query/key [B, T, Hk, Dk], value [B, T, Hv, Dv], g (log decay) and beta [B, T, Hv]; returns [B, T, Hv, Dv].
    Query and key are L2-normalised per head and the query scaled by Dk^-0.5, as in Qwen3-Next.
    """
    dtype = query.dtype
    t, hk, hv = key.shape[1], key.shape[2], value.shape[2]
    if hk != hv:  # grouped value heads: each key head serves hv // hk consecutive value heads
        query, key = (x.repeat_interleave(hv // hk, dim=2) for x in (query, key))
    # [B, H, T, D] in fp32 (no-op casts are skipped: fewer nodes to export)
    query, key, value, beta, g = (_fp32(x.transpose(1, 2)) for x in (query, key, value, beta, g))
    query = query * torch.rsqrt((query * query).sum(-1, keepdim=True) + 1e-6) * query.shape[-1] ** -0.5
    key = key * torch.rsqrt((key * key).sum(-1, keepdim=True) + 1e-6)
    chunk = min(MAX_CHUNK, 1 << max(0, (t - 1).bit_length()))
    pad = (chunk - t % chunk) % chunk
    if pad:
        query, key, value = (F.pad(x, (0, 0, 0, pad)) for x in (query, key, value))
        beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    v_beta, k_beta = value * beta.unsqueeze(-1), key * beta.unsqueeze(-1)
    query, key, k_beta, v_beta = (x.reshape(x.shape[0], x.shape[1], -1, chunk, x.shape[-1])
                                  for x in (query, key, k_beta, v_beta))
    decay = g.reshape(g.shape[0], g.shape[1], -1, chunk).cumsum(-1)  # log decay since the chunk start
    future = torch.ones(chunk, chunk, dtype=torch.bool, device=query.device).triu(1)
    pair = (decay.unsqueeze(-1) - decay.unsqueeze(-2)).masked_fill(future, float("-inf")).exp()
    inverse = unit_lower_inverse((k_beta @ key.transpose(-1, -2)) * pair)
    new_values = inverse @ v_beta
    intra = (query @ key.transpose(-1, -2)) * pair
    if query.shape[2] == 1:  # one chunk (up to 64 tokens): the state read from before it is zero
        out = intra @ new_values
    else:
        out = _across_chunks(query, key, k_beta, decay, new_values, intra, inverse, value.shape[-1])
    out = out.reshape(query.shape[0], query.shape[1], -1, value.shape[-1])[:, :, :t]
    return out.transpose(1, 2).to(dtype)


def _across_chunks(query: torch.Tensor, key: torch.Tensor, k_beta: torch.Tensor, decay: torch.Tensor,
                   new_values: torch.Tensor, intra: torch.Tensor, inverse: torch.Tensor, dv: int) -> torch.Tensor:
    """The sequential scan over chunks: each reads the recurrent state left by the previous ones."""
    k_cumdecay = inverse @ (k_beta * decay.exp().unsqueeze(-1))
    query = query * decay.exp().unsqueeze(-1)
    key = key * (decay[..., -1:] - decay).exp().unsqueeze(-1)
    chunk_decay = decay[..., -1].exp()[..., None, None]
    state = query.new_zeros(query.shape[0], query.shape[1], query.shape[-1], dv)
    outs = []
    for i in range(query.shape[2]):
        v_new = new_values[:, :, i] - k_cumdecay[:, :, i] @ state
        outs.append(query[:, :, i] @ state + intra[:, :, i] @ v_new)
        state = state * chunk_decay[:, :, i] + key[:, :, i].transpose(-1, -2) @ v_new
    return torch.stack(outs, dim=2)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


class DeltaNetExportForm(nn.Module):
    """A Qwen3-Next gated delta-net layer whose cache-free forward exports as a small graph."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.source = source  # its submodules and parameters are the layer's own, shared, not copied
        code = sys.modules[type(source).__module__]
        self._mask_padding = code.apply_mask_to_padding_states
        self._conv = code.causal_conv1d_fn

    @classmethod
    def convert(cls, source: nn.Module) -> tuple[nn.Module, str]:
        return cls(source), ""  # no gate: the same layer, in a form that exports

    def forward(self, hidden_states: torch.Tensor, cache: Any = None, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        src = self.source
        if cache is not None:
            return src(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        hidden_states = self._mask_padding(hidden_states, attention_mask)
        query, key, value, z, b, a = src.fix_query_key_value_ordering(src.in_proj_qkvz(hidden_states),
                                                                      src.in_proj_ba(hidden_states))
        batch, t = hidden_states.shape[:2]
        mixed = torch.cat([x.reshape(batch, t, -1) for x in (query, key, value)], dim=-1).transpose(1, 2)
        mixed = self._conv(mixed, src.conv1d.weight.squeeze(1), src.conv1d.bias, activation=src.activation)
        query, key, value = torch.split(mixed.transpose(1, 2), [src.key_dim, src.key_dim, src.value_dim], dim=-1)
        query = query.reshape(batch, t, -1, src.head_k_dim)
        key = key.reshape(batch, t, -1, src.head_k_dim)
        value = value.reshape(batch, t, -1, src.head_v_dim)
        g = -src.A_log.float().exp() * F.softplus(a.float() + src.dt_bias)
        core = chunk_gated_delta_rule(query, key, value, g, b.sigmoid())
        core = src.norm(core.reshape(-1, core.shape[-1]), z.reshape(-1, z.shape[-1]))
        return src.out_proj(core.reshape(batch, t, -1))
