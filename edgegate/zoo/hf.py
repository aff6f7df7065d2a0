"""Tiny Hugging Face causal LMs, built from their ``transformers`` config classes (no downloads).

Stage: reference models (for the converter tests and ``benchmarks.byom``). Input: an architecture name.
Output: a model wrapped as edgegate sees a causal LM (``input_ids`` -> logits), seeded, and trained.
Needs the ``transformers`` package (the ``hf`` extra), imported when a model is built.

Each is seeded, < 1M parameters, and trained for a few seconds on the built-in ``markov`` token corpus
(next-token loss at every position). Its routers are made decisive, as a real checkpoint's are, with a
margin term: the k-th expert's router logit should lead the first expert left out by ``MARGIN``. A
4-expert top-2 router trained a few seconds otherwise leaves ~2 % of tokens within a hair of the
k-th/k+1-th boundary, where any perturbation (int8, fp16, another runtime) changes the expert set.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from edgegate.convert.delta_rule import DeltaNetExportForm
from edgegate.data import Dataset, load_data
from edgegate.zoo.training import deterministic

VOCAB = 16  # the markov corpus
CONTEXT = 8
STEPS, BATCH, LR = 120, 64, 1e-2
TOP_K, MARGIN, DECISIVE = 2, 2.0, 0.1  # every tiny MoE routes top-2; the margin term's weight

_COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
           "max_position_embeddings": 64, "tie_word_embeddings": False}


class LMLogits(nn.Module):
    """A causal LM as edgegate sees one: ``input_ids`` [B, T] -> logits [B, T, vocab], no KV cache."""

    input_names = ("input_ids",)

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def _configs() -> dict[str, Callable[[], object]]:
    import transformers as tf  # the optional hf extra: only when a model is built

    return {
        "mixtral": lambda: tf.MixtralConfig(**_COMMON, head_dim=16, intermediate_size=32, num_hidden_layers=2,
                                            num_local_experts=4, num_experts_per_tok=2),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**_COMMON, head_dim=16, intermediate_size=32, moe_intermediate_size=32,
                                               num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                                               norm_topk_prob=False),
        "qwen3_next": lambda: tf.Qwen3NextConfig(  # one gated delta-net layer, then one gated full attention
            **_COMMON, head_dim=16, intermediate_size=64, num_hidden_layers=2,
            layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4,
            linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
            moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2),
        "deepseek_v3": lambda: tf.DeepseekV3Config(
            **{**_COMMON, "num_key_value_heads": 2}, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=2, first_k_dense_replace=0, n_routed_experts=4, num_experts_per_tok=2,
            n_shared_experts=1, n_group=1, topk_group=1, routed_scaling_factor=2.0, q_lora_rank=None,
            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    }


ARCHS = ("mixtral", "qwen3_moe", "qwen3_next", "deepseek_v3")


@functools.cache
def markov() -> tuple[Dataset, Dataset, Dataset]:  # cached: the splits are read-only arrays
    """(train, calibration, held-out) token windows [N, 8] int64, without labels (an LM's targets are its input)."""
    data = load_data("markov", ["input_ids"], {"input_ids": (CONTEXT,)})
    parts = []
    for split in ("train", "val", "test"):
        part = data.split(split)
        parts.append(Dataset(part.name, dict(part.inputs), None))
    return parts[0], parts[1], parts[2]


def _fast_delta_nets(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Swap Qwen3-Next's delta-net layers for edgegate's export form while training: the same parameters,
    but chunks of 8 tokens instead of transformers' 64 (10x faster on CPU). Returns how to undo it."""
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module).__name__ == "Qwen3NextGatedDeltaNet":
            parent, _, leaf = name.rpartition(".")
            owner = model.get_submodule(parent)
            owner.register_module(leaf, DeltaNetExportForm(module))
            swapped.append((owner, leaf, module))
    return swapped


def build(arch: str, seed: int = 0) -> LMLogits:
    import transformers as tf  # the optional hf extra: only when a model is built

    with deterministic(seed):
        lm = tf.AutoModelForCausalLM.from_config(_configs()[arch]())
    return LMLogits(lm).eval()


def train(model: LMLogits, seed: int = 0, steps: int = STEPS, decisive: float = 0.0) -> LMLogits:
    """Next-token training at every position of the markov windows, plus ``decisive`` times the router margin
    term (mean over tokens and MoE layers of ``relu(MARGIN - (logit_k - logit_k+1))``)."""
    train_set, _, _ = markov()
    x = torch.from_numpy(train_set.input())
    target = torch.roll(x, -1, dims=1)  # position t predicts token t+1; the last position is not scored
    swapped = _fast_delta_nets(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with deterministic(seed):
        for _ in range(steps):
            idx = torch.randint(0, len(x), (BATCH,), generator=gen)
            out = model.lm(input_ids=x[idx], use_cache=False, output_router_logits=bool(decisive))
            logits = out.logits[:, :-1]
            loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target[idx, :-1].reshape(-1))
            if decisive:
                for router_logits in out.router_logits:
                    top = router_logits.float().topk(TOP_K + 1, dim=-1).values
                    gap = top[:, TOP_K - 1] - top[:, TOP_K]  # the chosen k-th expert vs the first one left out
                    loss = loss + decisive * torch.relu(MARGIN - gap).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for owner, leaf, module in swapped:
        owner.register_module(leaf, module)
    return model.eval()


def trained(arch: str, seed: int = 0) -> LMLogits:
    """A tiny model of ``arch``, trained with decisive routers (seconds on one core)."""
    model = train(build(arch, seed), seed=seed, decisive=DECISIVE)
    if arch == "deepseek_v3":
        # Aux-loss-free balancing leaves a per-expert bias in real checkpoints; give ours one (it steers
        # the choice only), so the conversion of the bias is exercised.
        rng = np.random.default_rng(1)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.from_numpy(rng.normal(0.0, 0.02, buf.shape).astype(np.float32)))
    return model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------- BitNet

BITNET_LAYERS = 7  # BitLinear layers per decoder block: q, k, v, o, gate, up, down


def bitnet_config(linear_class: str = "bitlinear", mode: str = "offline"):
    """A tiny BitNet config whose ``quantization_config`` makes transformers build BitNet layers."""
    import transformers as tf  # the optional hf extra: only when a model is built

    return tf.BitNetConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64,
        quantization_config={"quant_method": "bitnet", "linear_class": linear_class, "quantization_mode": mode})


def with_bitnet_layers(config) -> nn.Module:
    """The model of a bitnet ``config`` with its Linear layers swapped for transformers' BitNet layers, as
    ``from_pretrained``'s BitNet quantizer does before it loads the tensors (lm_head stays float)."""
    import transformers as tf  # the optional hf extra: only when a model is built
    from transformers.integrations.bitnet import replace_with_bitnet_linear
    from transformers.utils.quantization_config import BitNetQuantConfig

    model = tf.AutoModelForCausalLM.from_config(config)
    qc = BitNetQuantConfig.from_dict(config.quantization_config)
    replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"], quantization_config=qc)
    return model.to_empty(device="cpu")


def packed_bitnet(seed: int = 0) -> nn.Module:
    """A packed BitNet b1.58 causal LM (``BitLinear``: uint8 codes, 4 per byte, and a ``weight_scale``), with
    seeded ternary codes and scales standing in for BitNet training; float layers seeded too."""
    from transformers.integrations.bitnet import BitLinear, pack_weights

    config = bitnet_config()
    model = with_bitnet_layers(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BitLinear):  # ternary codes and the inverse of the layer's scale
                codes = torch.randint(-1, 2, (module.out_features, module.in_features), generator=gen)
                module.weight.copy_(pack_weights(codes))
                module.weight_scale.fill_(float(torch.empty(()).uniform_(4, 8, generator=gen)))
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(std=0.5, generator=gen)
            elif "RMSNorm" in type(module).__name__:
                module.weight.fill_(1.0)
    model.model.rotary_emb.__init__(config)  # to_empty left its inv_freq buffers unset
    return model.eval()
