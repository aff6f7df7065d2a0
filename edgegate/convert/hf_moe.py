"""Converter family: Hugging Face ``transformers`` sparse-MoE blocks -> ``edgegate.nn.MoE``.

Stage: convert (DESIGN §10). Input: one MoE block of a ``transformers`` model (5.x layout: a router
module returning ``(logits, top-k weights, top-k indices)`` and an experts module holding fused 3-D
weights ``gate_up_proj`` [E, 2I, H] / ``down_proj`` [E, H, I]). Output: an ``edgegate.nn.MoE`` with
the same weights: one ``Expert`` (three ``nn.Linear``) per expert, so int8 quantizes each expert per
output channel and calibration sees each expert on its own routed tokens; the router becomes a
``TopKRouter`` (``TopKGate`` op) with the block's scoring, renormalization, score-correction bias and
scale; a shared expert becomes ``MoE.shared``, sigmoid-gated through the ``SigmoidGate`` op when the
block gates it. The replacement keeps the block's call contract (hidden states [B, T, H] in, the
same shape out).

Which routings are covered: softmax or sigmoid scores, top-k, optional renormalization, optional
score-correction bias (selection only), optional scaling factor, optional (gated) shared expert.
"top-k of the logits, then softmax over the k" (Granite, GPT-OSS-style routers) is softmax followed by
renormalization, so it is covered as such. Refused, with the reason (:data:`REFUSED`): grouped top-k
that actually restricts the groups, Phi-MoE's sparsemixer, capacity-limited routing, routers that scale
the expert *input*, experts that are not gated FFNs.

Each block class is one :class:`BlockSpec` line in :data:`SPECS`; nothing here imports
``transformers``: the spec names attributes and the converter reads them off the instance.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgegate.convert.registry import refuse, register
from edgegate.errors import ExportError
from edgegate.gates import GateKind
from edgegate.nn import MoE
from edgegate.ops.catalog import Scoring

log = logging.getLogger(__name__)

SOFTMAX, SIGMOID = Scoring.SOFTMAX, Scoring.SIGMOID

# transformers activation classes -> edgegate.nn.moe.Activation values
_ACTIVATIONS = {"SiLUActivation": "silu", "SiLU": "silu", "GELUActivation": "gelu", "GELUTanh": "gelu_tanh",
                "PytorchGELUTanh": "gelu_tanh", "ReLU": "relu"}


@dataclass(frozen=True)
class BlockSpec:
    """How to read one transformers MoE block class. Paths are attribute paths from the block."""

    architecture: str  # shown in docs/models.md
    scoring: Scoring
    renormalize: bool | str = True  # or the path of the flag (e.g. "gate.norm_topk_prob")
    router: str = "gate"  # the router module
    weight: str = "gate.weight"  # the router's [E, H] weight
    score_bias: str | None = None  # a per-expert bias added to the scores for the choice only
    scale: str | None = None  # the routed scaling factor (a float attribute)
    shared: str | None = None  # the shared expert (gate_proj / up_proj / down_proj / act_fn)
    shared_gate: str | None = None  # its Linear(H, 1) sigmoid gate
    grouped: str | None = None  # the router that carries num_group / topk_group (DeepSeek grouped top-k)
    refuse_if: tuple[tuple[str, Callable[[Any], bool], str], ...] = ()  # (path, predicate, reason)
    notes: str = ""


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _where(block: nn.Module) -> str:
    return f"{type(block).__module__}:{type(block).__qualname__}"


def _activation(act_fn: Any, block: nn.Module) -> str:
    name = type(act_fn).__name__
    if name not in _ACTIVATIONS:
        raise ExportError(f"{_where(block)}: expert activation {name} has no edgegate equivalent (supported: "
                          f"{', '.join(sorted(set(_ACTIVATIONS.values())))})")
    return _ACTIVATIONS[name]


def _check_grouping(router: Any, block: nn.Module) -> None:
    groups, chosen = getattr(router, "num_group", None), getattr(router, "topk_group", None)
    method = getattr(router, "topk_method", "group_limited")
    if method == "greedy" or groups in (None, 1) or chosen is None or chosen >= groups:
        return  # every group stays eligible: plain top-k over all experts
    raise ExportError(f"{_where(block)}: grouped top-k routing ({chosen} of {groups} expert groups per token) is "
                      "not supported; a model with n_group=1 or topk_group=n_group routes as plain top-k")


def _fused_experts(experts: nn.Module, block: nn.Module) -> tuple[torch.Tensor, ...]:
    """(gate [E, I, H], up [E, I, H], down [E, H, I], gate_up bias [E, 2I] | None, down bias | None)."""
    if not getattr(experts, "has_gate", True):
        raise ExportError(f"{_where(block)}: experts without a gate projection (plain up/down FFN) are not an "
                          "edgegate Expert")
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    if getattr(experts, "is_transposed", False):
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[1] != 2 * down.shape[2]:
        raise ExportError(f"{_where(block)}: expert weights of shapes {tuple(gate_up.shape)} / {tuple(down.shape)} "
                          "are not the fused [E, 2I, H] / [E, H, I] layout")
    gate, up = gate_up.chunk(2, dim=1)
    has_bias = getattr(experts, "has_bias", False)
    return (gate, up, down, experts.gate_up_proj_bias.detach() if has_bias else None,
            experts.down_proj_bias.detach() if has_bias else None)


def convert_block(block: nn.Module, spec: BlockSpec) -> tuple[MoE, str]:
    """The ``edgegate.nn.MoE`` computing what ``block`` computes, with its weights."""
    for path, bad, why in spec.refuse_if:
        if bad(_get(block, path)):
            raise ExportError(f"{_where(block)}: {why}")
    router = _get(block, spec.router)
    if spec.grouped is not None:
        _check_grouping(_get(block, spec.grouped), block)
    weight = _get(block, spec.weight).detach()
    n_experts, d_model = weight.shape
    gate, up, down, gate_up_bias, down_bias = _fused_experts(block.experts, block)
    act = _activation(block.experts.act_fn, block)
    renorm = spec.renormalize if isinstance(spec.renormalize, bool) else bool(_get(block, spec.renormalize))
    score_bias = None if spec.score_bias is None else _get(block, spec.score_bias).detach().reshape(-1)
    scale = 1.0 if spec.scale is None else float(_get(block, spec.scale))
    shared = None if spec.shared is None else _get(block, spec.shared)
    if shared is not None and _activation(shared.act_fn, block) != act:
        raise ExportError(f"{_where(block)}: the shared expert's activation differs from the experts'")
    moe = MoE(d_model, down.shape[2], n_experts, int(router.top_k), act=act, expert_bias=gate_up_bias is not None,
              scoring=str(spec.scoring), renormalize=renorm, score_bias=score_bias is not None, scale=scale,
              shared_hidden=0 if shared is None else shared.gate_proj.out_features,
              shared_gate=spec.shared_gate is not None,
              shared_bias=shared is not None and shared.gate_proj.bias is not None)
    with torch.no_grad():
        moe.router.proj.weight.copy_(weight)
        if score_bias is not None:
            moe.router.score_bias.copy_(score_bias)
        for e, expert in enumerate(moe.experts):
            expert.w1.weight.copy_(gate[e])
            expert.w3.weight.copy_(up[e])
            expert.w2.weight.copy_(down[e])
            if gate_up_bias is not None:
                g_bias, u_bias = gate_up_bias[e].chunk(2)
                expert.w1.bias.copy_(g_bias)
                expert.w3.bias.copy_(u_bias)
                expert.w2.bias.copy_(down_bias[e])
        if shared is not None:
            target = moe.shared.expert if spec.shared_gate is not None else moe.shared
            for mine, theirs in ((target.w1, shared.gate_proj), (target.w3, shared.up_proj),
                                 (target.w2, shared.down_proj)):
                mine.load_state_dict(theirs.state_dict())
            if spec.shared_gate is not None:
                moe.shared.gate.load_state_dict(_get(block, spec.shared_gate).state_dict())
    moe.to(device=weight.device, dtype=down.dtype)
    moe.router.score_bias.data = moe.router.score_bias.data.float()  # the op takes an fp32 bias
    return moe.train(block.training), str(GateKind.ROUTER)


# --------------------------------------------------------------------------------------- the registry

_T = "transformers.models"


def _cls(model_type: str, name: str) -> str:
    return f"{_T}.{model_type}.modeling_{model_type}:{name}"


_NORM = "gate.norm_topk_prob"
_V3 = {"score_bias": "gate.e_score_correction_bias", "renormalize": _NORM, "scale": "gate.routed_scaling_factor",
       "shared": "shared_experts", "grouped": "gate"}
_QWEN_SHARED = {"shared": "shared_expert", "shared_gate": "shared_expert_gate"}

SPECS: dict[str, BlockSpec] = {
    # softmax scores
    _cls("mixtral", "MixtralSparseMoeBlock"): BlockSpec("Mixtral", SOFTMAX),
    _cls("minimax", "MiniMaxSparseMoeBlock"): BlockSpec("MiniMax", SOFTMAX),
    _cls("qwen2_moe", "Qwen2MoeSparseMoeBlock"): BlockSpec("Qwen2-MoE", SOFTMAX, _NORM, **_QWEN_SHARED),
    _cls("qwen3_moe", "Qwen3MoeSparseMoeBlock"): BlockSpec("Qwen3-MoE", SOFTMAX, _NORM),
    _cls("qwen3_next", "Qwen3NextSparseMoeBlock"): BlockSpec("Qwen3-Next", SOFTMAX, _NORM, **_QWEN_SHARED),
    _cls("qwen3_5_moe", "Qwen3_5MoeSparseMoeBlock"): BlockSpec("Qwen3.5-MoE", SOFTMAX, **_QWEN_SHARED),
    _cls("qwen3_vl_moe", "Qwen3VLMoeTextSparseMoeBlock"): BlockSpec("Qwen3-VL-MoE (text)", SOFTMAX),
    _cls("olmoe", "OlmoeSparseMoeBlock"): BlockSpec("OLMoE", SOFTMAX, _NORM),
    _cls("flex_olmo", "FlexOlmoSparseMoeBlock"): BlockSpec("FlexOlmo", SOFTMAX, _NORM),
    _cls("mellum", "MellumSparseMoeBlock"): BlockSpec("Mellum", SOFTMAX, _NORM),
    _cls("hunyuan_v1_moe", "HunYuanMoEV1Moe"): BlockSpec("HunYuan-V1-MoE", SOFTMAX, weight="gate.wg.weight",
                                                          shared="shared_mlp"),
    _cls("ernie4_5_moe", "Ernie4_5_MoeSparseMoeBlock"): BlockSpec(
        "ERNIE-4.5-MoE", SOFTMAX, score_bias="gate.moe_statics.e_score_correction_bias", shared="shared_experts",
        notes="the renormalization's clamp at moe_norm_min (1e-12) is not reproduced"),
    _cls("jamba", "JambaSparseMoeBlock"): BlockSpec("Jamba", SOFTMAX, False, router="router",
                                                    weight="router.weight"),
    _cls("deepseek_v2", "DeepseekV2Moe"): BlockSpec(
        "DeepSeek-V2", SOFTMAX, False, scale="gate.routed_scaling_factor", shared="shared_experts", grouped="gate"),
    **{_cls(mt, name): BlockSpec(arch, SOFTMAX, True, router="router", weight="router.weight",
                                 notes="top-k of the logits then softmax over the k = softmax then renormalize")
       for mt, name, arch in (("granitemoe", "GraniteMoeMoE", "GraniteMoE"),
                              ("granitemoeshared", "GraniteMoeSharedMoE", "GraniteMoE-Shared"),
                              ("granitemoehybrid", "GraniteMoeHybridMoE", "GraniteMoE-Hybrid"))},
    # sigmoid scores, DeepSeek-V3 style: score-correction bias, renormalization flag, scaling factor
    **{_cls(mt, name): BlockSpec(arch, SIGMOID, **_V3)
       for mt, name, arch in (("deepseek_v3", "DeepseekV3MoE", "DeepSeek-V3"),
                              ("glm4_moe", "Glm4MoeMoE", "GLM-4.5 (glm4_moe)"),
                              ("glm4_moe_lite", "Glm4MoeLiteMoE", "GLM-4.7-Flash (glm4_moe_lite)"),
                              ("dots1", "Dots1MoE", "dots.llm1"),
                              ("solar_open", "SolarOpenMoE", "Solar-Open"),
                              ("minicpm5_moe", "MiniCPM5MoeMoE", "MiniCPM5-MoE"))},
    _cls("mimo_v2_flash", "MiMoV2FlashMoE"): BlockSpec("MiMo-V2-Flash", SIGMOID, **{**_V3, "shared": None,
                                                                                     "grouped": None}),
    _cls("minimax_m2", "MiniMaxM2SparseMoeBlock"): BlockSpec("MiniMax-M2", SIGMOID,
                                                             score_bias="e_score_correction_bias"),
    _cls("laguna", "LagunaSparseMoeBlock"): BlockSpec(
        "Laguna", SIGMOID, score_bias="gate.e_score_correction_bias", scale="routed_scaling_factor",
        shared="shared_experts",
        refuse_if=(("gate.router_logit_softcapping", lambda v: v > 0,
                    "router logit soft-capping (tanh) before the sigmoid is not supported"),)),
}

# Blocks whose routing or experts are not an edgegate MoE: refused with the reason.
REFUSED: dict[str, tuple[str, str]] = {
    _cls("phimoe", "PhimoeSparseMoeBlock"): (
        "Phi-MoE", "sparsemixer routing (a softmax over experts within a jitter margin of the best, one expert at "
                   "a time) is not a top-k gate"),
    _cls("gpt_oss", "GptOssMLP"): (
        "GPT-OSS", "experts use a clamped SwiGLU with biases on interleaved gate/up rows, not an edgegate Expert"),
    _cls("llama4", "Llama4TextMoe"): (
        "Llama 4", "the router's sigmoid weights scale the experts' input, not their output"),
    _cls("switch_transformers", "SwitchTransformersSparseMLP"): (
        "Switch Transformers", "capacity-limited top-1 routing drops tokens; edgegate routes every token"),
    _cls("nllb_moe", "NllbMoeSparseMLP"): (
        "NLLB-MoE", "capacity-limited top-2 routing drops tokens; edgegate routes every token"),
    _cls("doge", "DogeCDMoE"): ("Doge", "product-key expert retrieval is not a top-k gate over expert FFNs"),
    _cls("dbrx", "DbrxFFN"): ("DBRX", "router weights are normalized by a p-norm and experts use a v1/w1/w2 "
                                      "layout; not covered"),
}


def _becomes(spec: BlockSpec) -> str:
    renorm = ("renormalized" if spec.renormalize is True else "not renormalized" if spec.renormalize is False
              else f"renormalized if {spec.renormalize.rsplit('.', 1)[-1]}")
    parts = [f"MoE: {spec.scoring} top-k, {renorm}"]
    if spec.score_bias:
        parts.append("score-correction bias")
    if spec.scale:
        parts.append("scaled")
    if spec.shared:
        parts.append("sigmoid-gated shared expert" if spec.shared_gate else "shared expert")
    return ", ".join(parts)


def _register() -> None:
    for path, spec in SPECS.items():
        register(path, lambda block, _spec=spec: convert_block(block, _spec), family=str(GateKind.ROUTER),
                 architecture=spec.architecture, becomes=_becomes(spec), notes=spec.notes)
    for path, (architecture, reason) in REFUSED.items():
        refuse(path, reason, architecture=architecture)


_register()
