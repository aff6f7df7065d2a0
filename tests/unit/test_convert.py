"""Converters one module at a time: every registered transformers MoE block, Qwen3-Next's gated attention and
delta-net layers, BitNet layers; the registry, refusals and per-module verification.

Each block is built from its own config class (tiny sizes, seeded weights spread so that routing,
renormalization, score-correction biases and shared-expert gates all matter) and must be reproduced by
its replacement to float round-off.
"""

from __future__ import annotations

import copy
import importlib
import logging

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from edgegate import nn as enn  # noqa: E402
from edgegate.convert import (  # noqa: E402
    Conversion,
    convert,
    converters,
    hf_moe,
    verify,
)
from edgegate.convert.delta_rule import chunk_gated_delta_rule, unit_lower_inverse  # noqa: E402
from edgegate.convert.hf_bitnet import unpack_bitlinear  # noqa: E402
from edgegate.convert.registry import register  # noqa: E402
from edgegate.errors import ExportError  # noqa: E402
from edgegate.gates import GateKind, find_gates  # noqa: E402

H, I, E, K = 16, 8, 6, 2
_SIZES = {"hidden_size": H, "intermediate_size": I, "moe_intermediate_size": I, "num_experts": E,
          "num_local_experts": E, "n_routed_experts": E, "num_experts_per_tok": K,
          "shared_expert_intermediate_size": I, "vocab_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
          "num_hidden_layers": 1, "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "head_dim": 8,
          "moe_num_shared_experts": 1, "routed_scaling_factor": 2.5}
_OVERRIDES = {"granitemoehybrid": {"mamba_n_heads": 4, "mamba_d_head": 8}, "qwen3_moe": {"norm_topk_prob": False},
              "qwen3_next": {"norm_topk_prob": True}, "deepseek_v3": {"norm_topk_prob": True},
              "dots1": {"norm_topk_prob": False}}
_TEXT_CONFIG = {"qwen3_5_moe", "qwen3_vl_moe"}


def _block(path: str, seed: int = 0, **extra) -> nn.Module:
    """The transformers block class at ``path``, built from its model's config with tiny sizes."""
    module, name = path.split(":")
    model_type = module.split(".")[2]
    kwargs = {**_SIZES, **_OVERRIDES.get(model_type, {}), **extra}
    if model_type in _TEXT_CONFIG:
        config = transformers.AutoConfig.for_model(model_type, text_config=kwargs).text_config
    else:
        config = transformers.AutoConfig.for_model(model_type, **kwargs)
    cls = getattr(importlib.import_module(module), name)
    torch.manual_seed(seed)
    block = cls(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.3)  # spread routing over the experts; make the shared-expert gate matter
        for n, b in block.named_buffers():
            if "bias" in n:  # score-correction biases: large enough to change the choice of some tokens
                b.normal_(std=0.1)
        for n, p in block.named_parameters():
            if "e_score_correction_bias" in n:
                p.normal_(std=0.1)
    return block.eval()


@pytest.mark.parametrize("path", sorted(hf_moe.SPECS), ids=lambda p: p.rsplit(":", 1)[1])
def test_every_registered_moe_block_converts_weight_preserving(path):
    block = _block(path)
    x = torch.randn(3, 5, H, generator=torch.Generator().manual_seed(1))
    spec = hf_moe.SPECS[path]
    with torch.no_grad():
        want = block(x)
        conversion = convert(nn.Sequential(copy.deepcopy(block)))
        moe = conversion.module[0]
        got = moe(x)
    assert isinstance(moe, enn.MoE) and conversion.converted[0].family == GateKind.ROUTER
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=2e-6 * float(want.abs().max()), rtol=0)
    # What the block computes is what the replacement says it computes.
    assert moe.router.scoring == spec.scoring and moe.n_experts == E and moe.k == K
    assert moe.router.has_score_bias == (spec.score_bias is not None)
    assert (moe.shared is not None) == (spec.shared is not None)
    assert isinstance(moe.shared, enn.GatedSharedExpert) == (spec.shared_gate is not None)
    # The fused [E, 2I, H] / [E, H, I] weights became one Expert per expert: gate rows first, then up rows.
    gate_up = block.experts.gate_up_proj.detach()
    for e in (0, E - 1):
        assert torch.equal(moe.experts[e].w1.weight, gate_up[e, :I])
        assert torch.equal(moe.experts[e].w3.weight, gate_up[e, I:])
        assert torch.equal(moe.experts[e].w2.weight, block.experts.down_proj.detach()[e])


def test_router_options_are_read_from_the_block():
    no_renorm = convert(nn.Sequential(_block(hf_moe._cls("qwen3_moe", "Qwen3MoeSparseMoeBlock")))).module[0]
    assert no_renorm.router.renormalize is False and no_renorm.router.scale == 1.0
    v3 = convert(nn.Sequential(_block(hf_moe._cls("deepseek_v3", "DeepseekV3MoE")))).module[0]
    assert (v3.router.scoring, v3.router.renormalize, v3.router.scale) == ("sigmoid", True, 2.5)
    assert v3.router.score_bias.abs().sum() > 0 and "router.score_bias" in v3.state_dict()
    gates = find_gates(nn.Sequential(v3))
    assert gates["0.router"].details == {**gates["0.router"].details, "scoring": "sigmoid", "score_bias": True,
                                         "scale": 2.5, "shared_expert": True}


def test_the_score_bias_changes_the_choice_but_not_the_weights():
    block = _block(hf_moe._cls("deepseek_v3", "DeepseekV3MoE"))
    moe = convert(nn.Sequential(block)).module[0]
    x = torch.randn(64, H, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        w, idx = moe.router(x)
        moe.router.score_bias.zero_()
        w0, idx0 = moe.router(x)
    assert not torch.equal(idx, idx0)  # the bias moved some tokens to other experts
    scores = torch.sigmoid(moe.router.proj(x))
    picked = scores.gather(1, idx)
    torch.testing.assert_close(w, 2.5 * picked / picked.sum(-1, keepdim=True))


def test_grouped_top_k_that_restricts_the_groups_is_refused_naming_the_module():
    block = _block(hf_moe._cls("deepseek_v3", "DeepseekV3MoE"), n_group=2, topk_group=1)
    with pytest.raises(ExportError, match=r"^layer: transformers.*DeepseekV3MoE: grouped top-k routing \(1 of 2"):
        convert(nn.ModuleDict({"layer": block}))
    every_group = _block(hf_moe._cls("deepseek_v3", "DeepseekV3MoE"), n_group=2, topk_group=2)
    assert len(convert(nn.Sequential(every_group)).converted) == 1  # all groups eligible: plain top-k


def test_a_refused_block_stops_the_conversion_with_the_reason():
    config = transformers.PhimoeConfig(**{k: _SIZES[k] for k in ("hidden_size", "intermediate_size",
                                                                 "num_local_experts", "num_experts_per_tok")})
    block = importlib.import_module("transformers.models.phimoe.modeling_phimoe").PhimoeSparseMoeBlock(config)
    model = nn.ModuleDict({"mlp": block})
    with pytest.raises(ExportError, match=r"^mlp is a transformers.models.phimoe.*\(Phi-MoE\), which edgegate "
                                          r"refuses: sparsemixer routing"):
        convert(model)
    assert model["mlp"] is block  # nothing was replaced


def test_softcapped_laguna_router_is_refused():
    block = _block(hf_moe._cls("laguna", "LagunaSparseMoeBlock"), moe_router_logit_softcapping=30.0)
    with pytest.raises(ExportError, match="soft-capping"):
        convert(nn.Sequential(block))


def test_unknown_moe_like_blocks_are_reported(caplog):
    class FooSparseMoeBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = nn.ModuleList([nn.Linear(4, 4)])

    with caplog.at_level(logging.WARNING, logger="edgegate.convert"):
        conversion = convert(nn.Sequential(nn.Linear(4, 4), FooSparseMoeBlock()))
    assert conversion.converted == () and conversion.unrecognised == ("1",)
    assert "export as plain ops, without a gate" in caplog.text
    assert conversion.to_dict() == {"converted": [], "unrecognised": ["1"]}


def test_moe_blocks_with_their_own_gate_are_not_reported(caplog):
    """edgegate's own MoE (and any block holding a registered gate) already has its router."""
    from edgegate import nn as enn

    with caplog.at_level(logging.WARNING, logger="edgegate.convert"):
        conversion = convert(nn.Sequential(enn.MoE(8, 16, n_experts=4, k=2)))
    assert conversion.unrecognised == () and "without a gate" not in caplog.text


def test_registry_refuses_duplicates_and_unqualified_names():
    path = hf_moe._cls("mixtral", "MixtralSparseMoeBlock")
    assert converters()[path].architecture == "Mixtral"
    with pytest.raises(ExportError, match="registered already"):
        register(path, lambda m: (m, ""))
    with pytest.raises(ExportError, match="not a qualified class name"):
        register("MixtralSparseMoeBlock", lambda m: (m, ""))


def test_verify_names_the_module_that_diverges():
    block = _block(hf_moe._cls("mixtral", "MixtralSparseMoeBlock"))

    class Net(nn.Module):
        input_names = ("x",)

        def __init__(self) -> None:
            super().__init__()
            self.mlp = block

        def forward(self, x):
            return self.mlp(x)

    original = Net().eval()
    model = copy.deepcopy(original)
    conversion = convert(model)
    x = np.random.default_rng(0).normal(size=(4, 5, H)).astype(np.float32)
    checked = verify(original, conversion, {"x": x}, atol=1e-5)
    assert checked.checks["modules"]["mlp"] <= 1e-5 and checked.checks["rows"] == 4
    with torch.no_grad():
        model.mlp.experts[0].w2.weight.mul_(1.5)  # a wrong conversion
    with pytest.raises(ExportError, match=r"^the converted module mlp differs from the original by [0-9.e-]+ "
                                          r"\(> 1e-05\) on 4 calibration rows"):
        verify(original, conversion, {"x": x}, atol=1e-5)
    plain = Conversion(nn.Linear(2, 2))
    assert verify(nn.Linear(2, 2), plain, {"x": x}) is plain  # nothing converted: nothing to check


# ---------------------------------------------------------------------------------------- Qwen3-Next


def _qwen3_next(**extra):
    sizes = {"vocab_size": 16, "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2,
             "layer_types": ["linear_attention", "full_attention"],
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "linear_conv_kernel_dim": 4,
             "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2,
             "linear_num_value_heads": 4, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16,
             "num_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 256}
    config = transformers.Qwen3NextConfig(**{**sizes, **extra})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_qwen3_next_gated_attention_becomes_a_sigmoid_gate_with_its_own_gate_projection():
    model = _qwen3_next()
    original = copy.deepcopy(model)
    conversion = convert(model)
    attn = model.model.layers[1].self_attn
    assert type(attn).__name__ == "GatedAttentionOutput"
    # q_proj's rows per head were [query (16), gate (16)]: split, weight-preserving.
    q = original.model.layers[1].self_attn.q_proj.weight.reshape(2, 2, 16, 32)
    assert torch.equal(attn.q_proj.weight, q[:, 0].reshape(32, 32))
    assert torch.equal(attn.gate_proj.weight, q[:, 1].reshape(32, 32))
    families = {c.path.split(".")[-1]: c.family for c in conversion.converted}
    assert families == {"self_attn": "sigmoid", "mlp": "router", "linear_attn": ""}
    x = torch.randint(0, 16, (2, 8))
    checked = verify(original, conversion, {"input_ids": x.numpy()}, atol=1e-4)
    assert checked.checks["modules"]["model.layers.1.self_attn"] <= 1e-5
    gate = find_gates(model)["model.layers.1.self_attn"]
    assert gate.kind == GateKind.SIGMOID and gate.details["mode"] == "elementwise"
    assert attn.last_decision.shape == (2, 8, 32) and ((attn.last_decision > 0) & (attn.last_decision < 1)).all()


def test_unit_lower_inverse_is_the_triangular_inverse():
    a = torch.randn(3, 2, 37, 37, generator=torch.Generator().manual_seed(0)) * 0.3
    want = torch.linalg.inv(torch.eye(37) + a.tril(-1))
    torch.testing.assert_close(unit_lower_inverse(a), want, atol=1e-4, rtol=1e-4)
    assert torch.equal(unit_lower_inverse(torch.zeros(1, 1)), torch.ones(1, 1))


@pytest.mark.parametrize("tokens", [8, 13, 100])  # one chunk, one padded chunk, two chunks
def test_chunked_delta_rule_matches_transformers(tokens):
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    gen = torch.Generator().manual_seed(tokens)
    q, k = torch.randn(2, tokens, 2, 8, generator=gen), torch.randn(2, tokens, 2, 8, generator=gen)
    v = torch.randn(2, tokens, 4, 6, generator=gen)
    g = -torch.rand(2, tokens, 4, generator=gen)  # log decays <= 0
    beta = torch.rand(2, tokens, 4, generator=gen)
    want, _ = torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(chunk_gated_delta_rule(q, k, v, g, beta), want, atol=2e-5, rtol=1e-4)


def test_delta_net_export_form_is_the_same_layer_and_traces_to_a_small_graph():
    model = _qwen3_next(num_hidden_layers=1, layer_types=["linear_attention"])
    layer = model.model.layers[0].linear_attn
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = layer(x)
    form, family = converters()[f"{type(layer).__module__}:{type(layer).__qualname__}"].converter(layer)
    assert family == "" and form.source is layer  # the layer's own parameters, not copies
    with torch.no_grad():
        torch.testing.assert_close(form(x), want, atol=1e-5, rtol=1e-5)
    # transformers' export path unrolls a 63-step loop per chunk into thousands of nodes per layer.
    program = torch.export.export(form.eval(), (x,), strict=False)
    assert len(program.graph.nodes) < 150


# -------------------------------------------------------------------------------------------- BitNet


def test_bitlinear_unpacking_inverts_transformers_packing():
    from transformers.integrations.bitnet import pack_weights

    codes = torch.randint(-1, 2, (12, 7), generator=torch.Generator().manual_seed(0))
    packed = pack_weights(codes.clone())
    assert packed.dtype == torch.uint8 and packed.shape == (3, 7)
    assert torch.equal(unpack_bitlinear(packed, 12), codes.float())


def _bitlinear(bias: bool = False) -> nn.Module:
    from transformers.integrations.bitnet import BitLinear, pack_weights

    gen = torch.Generator().manual_seed(0)
    layer = BitLinear(24, 16, bias=bias, dtype=torch.float32)
    layer.weight.copy_(pack_weights(torch.randint(-1, 2, (16, 24), generator=gen)))
    layer.weight_scale.fill_(37.5)  # BitLinear divides by it: the layer's scale is 1/37.5
    if bias:
        layer.bias.copy_(torch.randn(16, generator=gen))
    return layer.eval()


@pytest.mark.parametrize("bias", [False, True])
def test_bitlinear_becomes_ternary_linear_with_the_checkpoints_codes(bias):
    layer = _bitlinear(bias)
    x = torch.randn(4, 5, 24, generator=torch.Generator().manual_seed(1)) * 3
    with torch.compiler.set_stance("force_eager"), torch.no_grad():
        want = layer(x)
    conversion = convert(nn.Sequential(layer))
    new = conversion.module[0]
    assert isinstance(new, enn.TernaryLinear) and new.fixed_scale and conversion.converted[0].family == "ternary"
    assert float(new.weight_scale) == pytest.approx(1 / 37.5)
    packed, scale = new.ternary_weights()
    assert packed.dtype == torch.uint8 and packed.numel() == 16 * 24 // 4  # 2 bits a weight
    assert torch.equal(new.codes_and_scale(new.weight)[0], unpack_bitlinear(layer.weight, 16))
    with torch.no_grad():
        torch.testing.assert_close(new(x), want, atol=1e-5, rtol=1e-5)
    assert find_gates(nn.Sequential(new))["0"].details["scale"] == "checkpoint"


def test_autobitlinear_offline_and_online():
    from transformers.integrations.bitnet import AutoBitLinear

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 24, generator=gen)
    offline = AutoBitLinear(24, 16, bias=True, online_quant=False).eval()
    online = AutoBitLinear(24, 16, bias=True, online_quant=True).eval()
    with torch.no_grad():
        offline.weight.copy_(torch.randint(-1, 2, (16, 24), generator=gen).float())
        offline.weight_scale.fill_(0.05)  # multiplies the output, bias included
        online.weight.normal_(std=0.1, generator=gen)
        for layer in (offline, online):
            layer.bias.normal_(generator=gen)
    for layer in (offline, online):
        with torch.compiler.set_stance("force_eager"), torch.no_grad():
            want = layer(x)
        new = convert(nn.Sequential(layer)).module[0]
        assert isinstance(new, enn.TernaryLinear) and new.fixed_scale == (layer is offline)
        with torch.no_grad():
            torch.testing.assert_close(new(x), want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        offline.weight.mul_(0.7)  # float weights where offline mode expects codes
    with pytest.raises(ExportError, match=r"^0: AutoBitLinear \[16x24\] is in offline mode but its weights are not "
                                          "ternary codes"):
        convert(nn.Sequential(offline))
