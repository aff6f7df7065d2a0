"""BitNet b1.58 checkpoints as users get them, loaded and converted to ``TernaryLinear`` with their own codes.

A packed checkpoint (``linear_class: bitlinear``, uint8 codes + ``weight_scale``, as bitnet-b1.58-2B-4T
ships) is written with ``save_pretrained`` and read back the way ``from_pretrained``'s BitNet quantizer
does (build the model, swap its Linear layers for ``BitLinear``, load the tensors); a QAT checkpoint
(``autobitlinear`` online: float weights, ternarized at run time) is what ``from_config`` +
``save_pretrained`` of a BitNet config gives. Both keep their own ternary weights through conversion.
The CLI export of a BitNet folder as 2-bit ``TernaryMatMul`` is tested in tests/e2e/test_intake_cli.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from edgegate import nn as enn  # noqa: E402
from edgegate.convert import convert, verify  # noqa: E402
from edgegate.gates import find_gates  # noqa: E402
from edgegate.loading import load  # noqa: E402
from edgegate.quantization.plan import QdqForm  # noqa: E402
from edgegate.quantization.step import QuantOptions, quantize_for_export  # noqa: E402
from edgegate.quantization.ternary import TernaryPTQLinear  # noqa: E402
from edgegate.zoo.hf import BITNET_LAYERS, bitnet_config, packed_bitnet  # noqa: E402
from tests.unit._hf import LMLogits, markov  # noqa: E402

LAYERS_PER_BLOCK = BITNET_LAYERS


def _load(folder) -> nn.Module:
    """The transformers model of a saved BitNet folder, as ``edgegate export`` loads it (BitNet layers swapped
    in before the tensors, as from_pretrained does, without the accelerate it insists on)."""
    return load(folder).module.model.eval()


def _reloaded(packed_checkpoint) -> LMLogits:
    """A fresh copy of the packed checkpoint, loaded from its folder."""
    _, folder = packed_checkpoint
    return LMLogits(_load(folder)).eval()


@pytest.fixture(scope="module")
def packed_checkpoint(tmp_path_factory) -> tuple[nn.Module, object]:
    folder = tmp_path_factory.mktemp("bitnet-packed")
    packed_bitnet().save_pretrained(folder)
    return _load(folder), folder


def test_packed_checkpoint_round_trips_with_uint8_codes(packed_checkpoint):
    model, folder = packed_checkpoint
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    packed = [k for k, d in dtypes.items() if d == "U8"]
    assert len(packed) == 2 * LAYERS_PER_BLOCK and all(k.endswith(".weight") for k in packed)
    assert sum(k.endswith("weight_scale") for k in dtypes) == 2 * LAYERS_PER_BLOCK


def test_float_export_of_ternary_layers_is_golden_checked_as_quantized(packed_checkpoint):
    model = _reloaded(packed_checkpoint)
    convert(model)
    _, calib, _ = markov()
    spec_args = (QdqForm.ASYMMETRIC, calib, None, None)
    fp32 = quantize_for_export(model, find_gates(model), QuantOptions("fp32"), *spec_args)
    assert fp32.exact is False and fp32.export_model is model
    plain = LMLogits(transformers.AutoModelForCausalLM.from_config(bitnet_config())).eval()
    assert quantize_for_export(plain, find_gates(plain), QuantOptions("fp32"), *spec_args).exact is True


def test_quant_ternary_keeps_the_checkpoints_own_ternary_layers(packed_checkpoint):
    model = _reloaded(packed_checkpoint)
    convert(model)
    before = {n: m.ternary_weights()[0].clone() for n, m in model.named_modules() if isinstance(m, enn.TernaryLinear)}
    _, calib, _ = markov()
    q = quantize_for_export(model, find_gates(model), QuantOptions("ternary"), QdqForm.ASYMMETRIC,
                            calib.subset(np.arange(64)), None, None)
    after = dict(q.export_model.named_modules())
    for name, packed in before.items():
        assert isinstance(after[name], enn.TernaryLinear) and torch.equal(after[name].ternary_weights()[0], packed)
    assert isinstance(after["lm.lm_head"], TernaryPTQLinear)  # the float head is what --quant ternary adds
    assert list(q.record["layers"]) == ["lm.lm_head"]


def test_qat_checkpoint_from_config_and_save_pretrained(tmp_path):
    config = bitnet_config("autobitlinear", "online")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)  # float weights on disk
    hf = _load(tmp_path)
    assert sum(type(m).__name__ == "AutoBitLinear" for m in hf.modules()) == 2 * LAYERS_PER_BLOCK
    original = LMLogits(hf)
    model = LMLogits(_load(tmp_path))
    conversion = verify(original, convert(model), {"input_ids": markov()[2].input()[:32]}, atol=1e-4)
    assert max(conversion.checks["modules"].values()) <= 1e-5
    layers = [m for m in model.modules() if isinstance(m, enn.TernaryLinear)]
    assert len(layers) == 2 * LAYERS_PER_BLOCK and not any(m.fixed_scale for m in layers)  # absmean, as online
