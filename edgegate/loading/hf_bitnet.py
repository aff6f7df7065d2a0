"""Hugging Face BitNet folders (``quantization_config.quant_method: bitnet``) built the way ``from_pretrained`` does.

Stage: load (called by ``loading.hf`` for such folders). Input: the folder, its ``transformers`` config and
architecture class. Output: the model with its Linear layers swapped for ``transformers``' BitNet layers
(``BitLinear`` / ``AutoBitLinear``) *before* the tensors are loaded, so the packed 2-bit codes and
``weight_scale`` of the checkpoint land in layers that hold them; the converters then turn those layers
into ``TernaryLinear`` with the same codes.

Why not ``from_pretrained``: its BitNet quantizer refuses to start unless ``accelerate`` is installed,
though nothing on its CPU loading path uses it (the check guards GPU device maps). Here the quantizer's
own ``preprocess_model`` does the swap (the same layers and ``modules_to_not_convert`` as
``from_pretrained``), and the safetensors tensors are assigned with ``load_state_dict``; a packed
``AutoBitLinear`` offline weight is unpacked as ``transformers``' BitNet deserializer does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from edgegate.errors import ModelFormatError, one_line

log = logging.getLogger(__name__)

QUANT_METHOD = "bitnet"


def is_bitnet(config: Any) -> bool:
    """Whether a ``transformers`` config (or its dict) asks for BitNet layers."""
    qc = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config",
                                                                                    None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)) == QUANT_METHOD


def load_bitnet(path: Path, cls: type, config: Any) -> tuple[Any, dict[str, list[str]]]:
    """(model in float32 with BitNet layers and the folder's tensors, {"missing_keys", "mismatched_keys"})."""
    from transformers.integrations.bitnet import VALUES_PER_ITEM, AutoBitLinear, unpack_weights
    from transformers.quantizers.auto import AutoHfQuantizer

    try:
        quantizer = AutoHfQuantizer.from_config(config.quantization_config, pre_quantized=True)
    except Exception as e:  # a config transformers cannot read: ValueError/TypeError
        raise ModelFormatError(f"{path}: its quantization_config does not load ({one_line(e, 160)}); "
                               "re-save the model") from e
    model = cls(config).float()  # tiny edge models: initialised, then overwritten by the folder's tensors
    quantizer.preprocess_model(model)  # Linear -> BitLinear/AutoBitLinear on the meta device, as from_pretrained
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    modules = dict(model.named_modules())
    expected = model.state_dict(keep_vars=True)
    mismatched = []
    for key, tensor in list(state.items()):
        owner, _, leaf = key.rpartition(".")
        module = modules.get(owner)
        if (isinstance(module, AutoBitLinear) and leaf == "weight" and tensor.dtype == torch.uint8
                and tensor.shape[0] * VALUES_PER_ITEM == module.out_features):
            tensor = unpack_weights(tensor, dtype=torch.float32)  # packed offline codes, as BitNetDeserialize
        elif tensor.is_floating_point():
            tensor = tensor.float()  # as from_pretrained(dtype=float32)
        if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
            mismatched.append(key)
            continue
        state[key] = tensor
    unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in mismatched}, strict=False,
                                       assign=True).unexpected_keys
    if unexpected:
        log.debug("%s: tensors no layer takes: %s", path, unexpected[:5])
    if getattr(config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    quantizer.postprocess_model(model)
    return model, {"missing_keys": missing, "mismatched_keys": mismatched}
