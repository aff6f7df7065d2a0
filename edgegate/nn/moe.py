"""Mixture of experts: top-k routing (Mixtral, Qwen-MoE, DeepSeek-V3 style) and MoE++ zero / copy /
constant experts, with optional shared experts.

Stage: model family (``edgegate.nn``). Input: tokens as rows, ``x`` [T, d_model] (any leading dims
are flattened to rows and restored). Output: ``sum_j w_j * E_{i_j}(x)`` over the k routed slots, plus
the shared expert's output when there is one, same shape as ``x``. Routing goes through the
``TopKGate`` custom op (scores = softmax or sigmoid in fp32, an optional score-correction bias that
steers only the choice, top-k, optional renormalization, a scale), so the exported graph keeps the
router by name.

Slot order of the router: ``n_experts`` FFN experts, then ``n_zero`` zero experts (output 0), then
``n_copy`` copy experts (output x), then ``n_const`` constant experts (MoE++: ``a1*x + a2*v`` with
``[a1, a2] = softmax(W_c x)`` and a learned vector ``v``). Zero-computation experts cost (almost)
nothing, so tokens the router sends there skip FFN compute. A shared expert (``shared_hidden > 0``)
sees every token; with ``shared_gate`` its output is scaled by ``sigmoid(w_g x)`` through the
``SigmoidGate`` op (Qwen2-MoE, Qwen3-Next), a gate of its own (:class:`GatedSharedExpert`).

Two formulations of the same output: *dense* (every slot computed for every token, then the routed
ones gathered: static shapes, what training uses) and *sparse dispatch* (each slot runs only on the
tokens routed to it: the eager eval default). Sparse dispatch is what lets gate-aware calibration
(``edgegate.calibration``) observe each expert on exactly its routed tokens. An export writes the
block in its ``export_form`` (:class:`MoEForm`, set by the exporter per target): dense, or sparse,
where the FFN experts become one ``RoutedExperts`` op over the dense routing weights (the routed
slots' weights scattered into a [T, n_experts] matrix, so a slot of weight 0 is not computed) and the
zero / copy / constant slots and the shared expert are a few elementwise ops beside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgegate.errors import EdgegateError
from edgegate.gates import GateFamily, GateInfo, GateKind, Observe, register_family
from edgegate.nn._record import exporting, record
from edgegate.nn.routed_experts import ACTIVATIONS, Activation, MoEForm, expert_params, routed_experts
from edgegate.ops import torch_ops as ops
from edgegate.ops.catalog import Scoring


def _choice(enum: type[StrEnum], value: str, what: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        raise EdgegateError(f"{what}={value!r} is unknown; use one of {', '.join(e.value for e in enum)}") from None


class TopKRouter(nn.Module):
    """Linear router -> ``TopKGate``. Returns ``(weights fp32 [T, k], indices int64 [T, k])``.

    ``scoring``: "softmax" (default) or "sigmoid"; ``renormalize``: divide the k weights by their sum;
    ``score_bias``: keep a per-expert bias buffer added to the scores for the choice only (DeepSeek-V3's
    ``e_score_correction_bias``); ``scale``: multiply the weights (``routed_scaling_factor``); ``bias``:
    the projection has a bias. After each forward: ``aux_loss`` (Switch-Transformer load balancing
    ``E * sum_e f_e * P_e``, with gradients in training), and in eval ``last_decision`` (indices),
    ``last_weights`` and ``last_load`` (fraction of the T*k routed slots that went to each expert; sums to 1).

    MoDES dynamic expert skipping (off by default): after top-k and renormalisation, a slot with
    ``skip_importance * weight < skip_threshold`` gets weight 0 and the others keep theirs (``set_skip``;
    ``edgegate.calibration.expert_skip`` calibrates both). ``skips`` says whether it is on.
    """

    def __init__(self, d_model: int, n_experts: int, k: int, scoring: str = "softmax", renormalize: bool = True,
                 score_bias: bool = False, scale: float = 1.0, bias: bool = False, skip_importance: float = 1.0,
                 skip_threshold: float = 0.0) -> None:
        super().__init__()
        if not 1 <= k <= n_experts:
            raise EdgegateError(f"TopKRouter: k={k} must be between 1 and n_experts={n_experts}")
        self.d_model, self.n_experts, self.k = d_model, n_experts, k
        self.scoring = _choice(Scoring, scoring, "TopKRouter: scoring")
        self.renormalize, self.has_score_bias, self.scale = bool(renormalize), bool(score_bias), float(scale)
        self.proj = nn.Linear(d_model, n_experts, bias=bias)
        # Always a tensor (the op takes one); saved in the state_dict only when the router has a bias.
        self.register_buffer("score_bias", torch.zeros(n_experts), persistent=self.has_score_bias)
        self.aux_loss: torch.Tensor | None = None
        self.last_decision: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None
        self.set_skip(skip_importance, skip_threshold)

    def get_config(self) -> dict[str, Any]:
        skip = {"skip_importance": self.skip_importance, "skip_threshold": self.skip_threshold} if self.skips else {}
        return {"d_model": self.d_model, "n_experts": self.n_experts, "k": self.k, "scoring": str(self.scoring),
                "renormalize": self.renormalize, "score_bias": self.has_score_bias, "scale": self.scale,
                "bias": self.proj.bias is not None, **skip}

    def set_skip(self, importance: float, threshold: float) -> None:
        """Drop a routed slot when ``importance * weight < threshold`` (MoDES); threshold 0 turns skipping off."""
        if not (importance >= 0 and threshold >= 0):  # also refuses NaN
            raise EdgegateError(f"TopKRouter: skip importance {importance} and threshold {threshold} must be >= 0")
        self.skip_importance, self.skip_threshold = float(importance), float(threshold)

    @property
    def skips(self) -> bool:
        return self.skip_threshold > 0

    def train(self, mode: bool = True) -> TopKRouter:
        # The training aux loss holds an autograd graph; drop it so eval models deep-copy and pickle.
        self.aux_loss = None
        return super().train(mode)

    def choice_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The fp32 scores [T, E] whose top-k the router picks (scores + score bias), from its logits.

        Calibration ranks slots by them to widen routing for coverage; they mirror the ``TopKGate`` body.
        """
        logits = logits.float()
        scores = torch.sigmoid(logits) if self.scoring is Scoring.SIGMOID else torch.softmax(logits, dim=-1)
        return scores + self.score_bias

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.proj(x)
        weights, indices = ops.topk_gate(logits, self.k, self.score_bias, self.scoring, self.renormalize,
                                         self.scale, self.skip_importance, self.skip_threshold)
        if self.training or not exporting():
            probs = torch.softmax(logits.float(), dim=-1)
            load = F.one_hot(indices, self.n_experts).sum(1).float().mean(0) / self.k
            aux = self.n_experts * (load * probs.mean(0)).sum()
            if self.training:
                self.aux_loss = aux  # keeps its graph: the trainer adds it to the loss
            else:  # a skipped slot is decided as "no expert" (-1): fidelity compares skips too
                record(self, aux_loss=aux, last_decision=self.mark_skipped(weights, indices), last_weights=weights,
                       last_load=load)
        return weights, indices

    def mark_skipped(self, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``indices`` with -1 in the deployed slots (the first k) that skipping dropped; unchanged when it is
        off. Slots past k (calibration's widened routes, weight 0 by design) keep their ids."""
        if not self.skips:
            return indices
        deployed = torch.where(weights[:, : self.k] == 0, -1, indices[:, : self.k])
        return deployed if indices.shape[1] == self.k else torch.cat([deployed, indices[:, self.k:]], dim=1)


class Expert(nn.Module):
    """Gated FFN expert: ``w2(act(w1 x) * w3 x)`` (SwiGLU with ``act="silu"``, the Mixtral expert)."""

    def __init__(self, d_model: int, d_hidden: int, act: str = "silu", bias: bool = False) -> None:
        super().__init__()
        self.d_model, self.d_hidden = d_model, d_hidden
        self.act = _choice(Activation, act, "Expert: act")
        self.w1 = nn.Linear(d_model, d_hidden, bias=bias)
        self.w3 = nn.Linear(d_model, d_hidden, bias=bias)
        self.w2 = nn.Linear(d_hidden, d_model, bias=bias)

    def get_config(self) -> dict[str, Any]:
        return {"d_model": self.d_model, "d_hidden": self.d_hidden, "act": str(self.act),
                "bias": self.w1.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(ACTIVATIONS[self.act](self.w1(x)) * self.w3(x))


class GatedSharedExpert(nn.Module):
    """A shared expert whose output is scaled per token by ``sigmoid(gate(x))`` (``SigmoidGate`` op).

    ``gate`` is ``Linear(d_model, 1)``; ``last_decision`` (eval) = the gate values [T, 1].
    """

    def __init__(self, d_model: int, d_hidden: int, act: str = "silu", bias: bool = False) -> None:
        super().__init__()
        self.expert = Expert(d_model, d_hidden, act, bias)
        self.gate = nn.Linear(d_model, 1, bias=False)
        self.last_decision: torch.Tensor | None = None

    def get_config(self) -> dict[str, Any]:
        return self.expert.get_config()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(x)
        if not self.training and not exporting():
            record(self, last_decision=torch.sigmoid(g))
        return ops.sigmoid_gate(self.expert(x), g)


class MoE(nn.Module):
    """Top-k mixture over FFN experts plus optional MoE++ zero-computation experts and a shared expert.

    Router options (``scoring``, ``renormalize``, ``score_bias``, ``scale``, ``router_bias``) are those of
    :class:`TopKRouter`; ``act`` / ``expert_bias`` those of :class:`Expert`. ``shared_hidden > 0`` adds a
    shared expert of that width (``self.shared``), sigmoid-gated with ``shared_gate``.

    ``last_decision`` (eval) = routed slot indices [T, k]; ``last_load`` = fraction of routed slots per
    slot [n_slots]; ``last_ffn_per_token`` = mean number of FFN experts each token used.

    ``dispatch`` picks the eager eval formulation: ``"sparse"`` (default; each expert runs on its routed
    tokens only) or ``"dense"``; training uses the dense one. ``export_form`` (a :class:`MoEForm`, dense
    by default; the exporter sets it per target) picks the exported one. All give the same output up to
    float summation order (tested). The combination reads the router's output shape, not ``k``, so a
    caller may widen the routing (e.g. extra slots with weight 0 for calibration coverage).
    """

    def __init__(self, d_model: int, d_hidden: int, n_experts: int, k: int,
                 n_zero: int = 0, n_copy: int = 0, n_const: int = 0, *, act: str = "silu", expert_bias: bool = False,
                 scoring: str = "softmax", renormalize: bool = True, score_bias: bool = False, scale: float = 1.0,
                 router_bias: bool = False, shared_hidden: int = 0, shared_gate: bool = False,
                 shared_bias: bool = False) -> None:
        super().__init__()
        if n_experts < 1 or min(n_zero, n_copy, n_const, shared_hidden) < 0:
            raise EdgegateError(f"MoE: needs n_experts >= 1 and non-negative MoE++ counts, got "
                                f"{n_experts=}, {n_zero=}, {n_copy=}, {n_const=}, {shared_hidden=}")
        if shared_gate and not shared_hidden:
            raise EdgegateError("MoE: shared_gate needs a shared expert (shared_hidden > 0)")
        self.d_model, self.d_hidden, self.n_experts, self.k = d_model, d_hidden, n_experts, k
        self.n_zero, self.n_copy, self.n_const = n_zero, n_copy, n_const
        self.n_slots = n_experts + n_zero + n_copy + n_const
        self._options = {"act": act, "expert_bias": expert_bias, "scoring": scoring, "renormalize": renormalize,
                         "score_bias": score_bias, "scale": scale, "router_bias": router_bias,
                         "shared_hidden": shared_hidden, "shared_gate": shared_gate, "shared_bias": shared_bias}
        self.experts = nn.ModuleList(Expert(d_model, d_hidden, act, expert_bias) for _ in range(n_experts))
        if n_const:
            self.const_vectors = nn.Parameter(torch.randn(n_const, d_model) * 0.02)
            self.const_mix = nn.Linear(d_model, 2 * n_const)
        self.router = TopKRouter(d_model, self.n_slots, k, scoring, renormalize, score_bias, scale, router_bias)
        self.shared: nn.Module | None = None
        if shared_hidden:
            cls = GatedSharedExpert if shared_gate else Expert
            self.shared = cls(d_model, shared_hidden, act, shared_bias)
        self.dispatch = "sparse"  # eager-eval formulation; not part of the config (same function either way)
        self.export_form = MoEForm.DENSE  # exported formulation; set by the exporter, not part of the config
        self.last_decision: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None
        self.last_ffn_per_token: float | None = None

    def get_config(self) -> dict[str, Any]:
        return {"d_model": self.d_model, "d_hidden": self.d_hidden, "n_experts": self.n_experts, "k": self.k,
                "n_zero": self.n_zero, "n_copy": self.n_copy, "n_const": self.n_const, **self._options}

    def gate_owner_details(self, path: str) -> dict[str, dict[str, Any]]:
        """What ``find_gates`` records on this block's router: the block's path and slot layout."""
        return {"router": {"moe": path, "n_ffn": self.n_experts, "n_zero": self.n_zero, "n_copy": self.n_copy,
                           "n_const": self.n_const, "slot_kinds": self.slot_kinds(),
                           "shared_expert": self.shared is not None}}

    def slot_kinds(self) -> list[str]:
        """Kind of each router slot, in slot order: "ffn", "zero", "copy", "const"."""
        return (["ffn"] * self.n_experts + ["zero"] * self.n_zero + ["copy"] * self.n_copy
                + ["const"] * self.n_const)

    @property
    def aux_loss(self) -> torch.Tensor | None:
        return self.router.aux_loss

    def slot_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every slot's output for every token, [T, n_slots, d]. Dense on purpose: static shapes export."""
        t, d = x.shape
        parts = [torch.stack([e(x) for e in self.experts], dim=1)]
        if self.n_zero:
            parts.append(x.new_zeros(t, self.n_zero, d))
        if self.n_copy:
            parts.append(x.unsqueeze(1).expand(t, self.n_copy, d))
        if self.n_const:
            alpha = torch.softmax(self.const_mix(x).reshape(t, self.n_const, 2), dim=-1)
            parts.append(alpha[..., :1] * x.unsqueeze(1) + alpha[..., 1:] * self.const_vectors.unsqueeze(0))
        return torch.cat(parts, dim=1)

    def sparse_picked(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The routed slots' outputs [T, k, d], each slot run only on the tokens routed to it.

        Same values as gathering :meth:`slot_outputs` at ``indices``; an expert that no token chose is
        not called at all (so it also sees no calibration rows). A slot id -1 (skipped) stays zero.
        """
        t, d = x.shape
        picked = x.new_zeros(t, indices.shape[1], d)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.nonzero(indices == e, as_tuple=True)  # top-k slots are distinct: tokens unique
            if tok.numel():
                picked[tok, slot] = expert(x[tok])
        # Zero experts: their rows stay 0. Copy experts: the token itself.
        first_copy = self.n_experts + self.n_zero
        tok, slot = torch.nonzero((indices >= first_copy) & (indices < first_copy + self.n_copy), as_tuple=True)
        picked[tok, slot] = x[tok]
        if self.n_const:
            first_const = first_copy + self.n_copy
            tok, slot = torch.nonzero(indices >= first_const, as_tuple=True)
            if tok.numel():
                # const_mix runs once per token routed to any constant expert (path-conditional too).
                rows, inverse = torch.unique(tok, return_inverse=True)
                alpha = torch.softmax(self.const_mix(x[rows]).reshape(-1, self.n_const, 2), dim=-1)
                c = indices[tok, slot] - first_const
                a = alpha[inverse, c]  # [n, 2]
                picked[tok, slot] = a[:, :1] * x[tok] + a[:, 1:] * self.const_vectors[c]
        return picked

    def sparse_export(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                      params: list[torch.Tensor]) -> torch.Tensor:
        """The routed slots' weighted sum [T, d] in the sparse export form: the FFN experts as one
        ``RoutedExperts`` op over the dense routing weights, the MoE++ slots as elementwise ops."""
        t = x.shape[0]
        # A skipped slot (index -1, weight 0) lands in a spare last column, dropped: it adds to no slot.
        # Added, not assigned, so it cannot overwrite a routed slot's weight (top-k slots are distinct).
        slot = torch.where(indices < 0, torch.full_like(indices, self.n_slots), indices)
        dense = weights.new_zeros(t, self.n_slots + 1).scatter_add(1, slot, weights)[:, :self.n_slots].to(x.dtype)
        # The op takes non-negative weights (ORT's kernel skips a slot of weight <= 0); the weights are scores
        # times the router's scale, so a negative scale is taken out and put back (the sum is linear in them).
        sign = -1.0 if self.router.scale < 0 else 1.0
        y = sign * routed_experts(x, sign * dense[:, :self.n_experts], params, self.experts[0].act,
                                  self.experts[0].w1.bias is not None, indices.shape[-1])
        # Zero experts add nothing; copy experts add their weight times the token.
        first_copy = self.n_experts + self.n_zero
        if self.n_copy:
            y = y + dense[:, first_copy:first_copy + self.n_copy].sum(-1, keepdim=True) * x
        if self.n_const:  # sum_c w_c (a1_c x + a2_c v_c), [a1, a2] = softmax(W_c x) per constant expert
            alpha = torch.softmax(self.const_mix(x).reshape(t, self.n_const, 2), dim=-1)
            w = dense[:, first_copy + self.n_copy:].unsqueeze(-1)  # [T, C, 1]
            y = y + (w * alpha[..., :1]).sum(1) * x + (w * alpha[..., 1:] * self.const_vectors.unsqueeze(0)).sum(1)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_routed(x)[0]

    def forward_routed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, indices)``: the output and the routed slot ids, int64 [..., k] over ``x``'s leading dims (-1 for
        a slot the router skipped).

        Models that export their routing (e.g. the zoo's ``MoEClassifier``, output ``route_indices``)
        return these indices so a deployed bundle can report its route histogram.
        """
        shape = x.shape
        x = x.reshape(-1, self.d_model)
        weights, indices = self.router(x)
        routed = self.router.mark_skipped(weights, indices)  # -1: a slot the router skipped (MoDES)
        params = expert_params(self.experts) if exporting() and self.export_form == MoEForm.SPARSE else None
        if params is not None:  # a skipped slot has weight 0: the sparse form computes nothing for it
            y = self.sparse_export(x, weights, indices, params)
        else:
            if self.training or exporting() or self.dispatch == "dense":
                outs = self.slot_outputs(x)
                picked = torch.gather(outs, 1, indices.unsqueeze(-1).expand(-1, -1, self.d_model))  # [T, k, d]
            else:
                picked = self.sparse_picked(x, routed)  # a skipped slot (-1) is not computed
            y = (weights.to(x.dtype).unsqueeze(-1) * picked).sum(dim=1)
        if self.shared is not None:
            y = y + self.shared(x)
        if not self.training and not exporting():
            record(self, last_decision=routed, last_load=self.router.last_load,
                   last_ffn_per_token=float(((routed >= 0) & (routed < self.n_experts)).sum(1).float().mean()))
        return y.reshape(shape), routed.reshape(*shape[:-1], routed.shape[-1])


# ------------------------------------------------------------------------------------------ gate families


def _router_layers(router: TopKRouter, info: GateInfo, model: nn.Module) -> Iterator[tuple[nn.Module, str]]:
    yield router.proj, f"router projection of {info.name or 'the model'}"
    moe_path = info.details.get("moe")  # find_gates records the MoE that owns this router
    if moe_path is not None:
        moe = model.get_submodule(moe_path)
        if getattr(moe, "n_const", 0):
            yield moe.const_mix, f"MoE++ constant-expert mixing weights of {moe_path or 'the model'}"


register_family(TopKRouter, GateFamily(
    GateKind.ROUTER, Observe.ROUTES,
    details=lambda r: {"k": r.k, "n_experts": r.n_experts, "scoring": str(r.scoring), "renormalize": r.renormalize,
                       "score_bias": r.has_score_bias, "scale": r.scale,
                       **({"skip_importance": r.skip_importance, "skip_threshold": r.skip_threshold} if r.skips
                          else {})},
    decision_layers=_router_layers,
    summary="top-k expert routing (TopKGate); the router projection (and MoE++ const_mix) stays float"))
register_family(GatedSharedExpert, GateFamily(
    GateKind.SIGMOID, Observe.DECISION,
    details=lambda m: {"d_model": m.expert.d_model, "d_hidden": m.expert.d_hidden, "gates": "shared expert"},
    decision_layers=lambda m, info, model: [(m.gate, "shared-expert gate projection")],
    summary="a shared expert scaled by sigmoid(gate(x)) (SigmoidGate); the gate projection stays float"))
