"""BitNet b1.58 checkpoints as users get them, converted and exported as 2-bit ``TernaryMatMul``.

A packed checkpoint (``linear_class: bitlinear``, uint8 codes + ``weight_scale``, as bitnet-b1.58-2B-4T
ships) is written with ``save_pretrained`` and read back the way ``from_pretrained``'s BitNet quantizer
does (build the model, swap its Linear layers for ``BitLinear``, load the tensors); a QAT checkpoint
(``autobitlinear`` online: float weights, ternarized at run time) is what ``from_config`` +
``save_pretrained`` of a BitNet config gives. Both keep their own ternary weights through conversion.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from edgegate import nn as enn  # noqa: E402
from edgegate.convert import convert, verify  # noqa: E402
from edgegate.gates import GateKind, find_gates  # noqa: E402
from edgegate.onnx_export.torch_export import ExportOptions, export_onnx  # noqa: E402
from edgegate.quantization.plan import Flavor  # noqa: E402
from edgegate.quantization.step import QuantOptions, quantize_for_export  # noqa: E402
from edgegate.quantization.ternary import TernaryPTQLinear  # noqa: E402
from edgegate.zoo.hf import BITNET_LAYERS, bitnet_config, packed_bitnet, with_bitnet_layers  # noqa: E402
from tests.unit._hf import LMLogits, markov  # noqa: E402

LAYERS_PER_BLOCK = BITNET_LAYERS


def _load(folder, config) -> nn.Module:
    """Read a saved BitNet folder as from_pretrained would (it needs accelerate, which edgegate does not)."""
    from safetensors.torch import load_file

    model = with_bitnet_layers(config)
    tensors = load_file(folder / "model.safetensors")
    model.load_state_dict(tensors, strict=False)
    missing = {k for k in model.state_dict() if "rotary_emb" not in k} - set(tensors)
    assert not missing, missing
    model.model.rotary_emb.__init__(config)  # its buffers are not in the checkpoint
    return model.eval()


def _reloaded(packed_checkpoint) -> LMLogits:
    """A fresh copy of the packed checkpoint, loaded from its folder."""
    _, folder = packed_checkpoint
    return LMLogits(_load(folder, transformers.AutoConfig.from_pretrained(folder))).eval()


@pytest.fixture(scope="module")
def packed_checkpoint(tmp_path_factory) -> tuple[nn.Module, object]:
    folder = tmp_path_factory.mktemp("bitnet-packed")
    packed_bitnet().save_pretrained(folder)
    return _load(folder, transformers.AutoConfig.from_pretrained(folder)), folder


def test_packed_checkpoint_round_trips_with_uint8_codes(packed_checkpoint):
    model, folder = packed_checkpoint
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    packed = [k for k, d in dtypes.items() if d == "U8"]
    assert len(packed) == 2 * LAYERS_PER_BLOCK and all(k.endswith(".weight") for k in packed)
    assert sum(k.endswith("weight_scale") for k in dtypes) == 2 * LAYERS_PER_BLOCK


def test_bitnet_exports_its_own_ternary_codes_at_2_bits_and_matches_transformers(packed_checkpoint):
    hf, _ = packed_checkpoint
    original = LMLogits(hf).eval()
    model = _reloaded(packed_checkpoint)
    x = markov()[2].input()[:64]
    conversion = verify(original, convert(model), {"input_ids": x}, atol=1e-4)
    assert Counter(c.family for c in conversion.converted) == {GateKind.TERNARY: 2 * LAYERS_PER_BLOCK}
    assert max(conversion.checks["modules"].values()) <= 1e-5
    assert conversion.checks["end_to_end"] == "recorded (in-graph activation rounding)"
    assert len(find_gates(model).by_kind(GateKind.TERNARY)) == 2 * LAYERS_PER_BLOCK

    graph = export_onnx(model, torch.from_numpy(x), "input_ids", ExportOptions(batch=len(x)))  # static: faster
    nodes = [n for n in graph.graph.node if n.domain == "edgegate"]
    assert Counter(n.op_type for n in nodes) == {"TernaryMatMul": 2 * LAYERS_PER_BLOCK}
    ternary_weights = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, enn.TernaryLinear))
    packed = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.UINT8]
    assert sum(int(np.prod(t.dims)) for t in packed) * 4 == ternary_weights  # 2 bits per weight
    matrices = [t.name for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2]
    assert len(matrices) == 2, matrices  # the embedding and lm_head: no ternary layer is stored as floats

    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": x})[0]
    with torch.no_grad():
        want = original(torch.from_numpy(x)).numpy()
    # Per-token 8-bit activation rounding sits inside the graph: a value within an ulp of a rounding
    # boundary may round the other way in ORT, moving that token's logits by a quantization step. Every
    # other logit matches to float round-off and the predicted tokens all agree.
    close = np.abs(got - want) <= 1e-4
    assert close.mean() >= 0.99 and np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.99
    assert float(np.abs(got - want).max()) <= 0.02 * float(np.abs(want).max())


def test_float_export_of_ternary_layers_is_golden_checked_as_quantized(packed_checkpoint):
    model = _reloaded(packed_checkpoint)
    convert(model)
    _, calib, _ = markov()
    spec_args = (Flavor.CPU, calib, None, None)
    fp32 = quantize_for_export(model, find_gates(model), QuantOptions("fp32"), *spec_args)
    assert fp32.exact is False and fp32.export_model is model
    plain = LMLogits(transformers.AutoModelForCausalLM.from_config(bitnet_config())).eval()
    assert quantize_for_export(plain, find_gates(plain), QuantOptions("fp32"), *spec_args).exact is True


def test_quant_ternary_keeps_the_checkpoints_own_ternary_layers(packed_checkpoint):
    model = _reloaded(packed_checkpoint)
    convert(model)
    before = {n: m.ternary_weights()[0].clone() for n, m in model.named_modules() if isinstance(m, enn.TernaryLinear)}
    _, calib, _ = markov()
    q = quantize_for_export(model, find_gates(model), QuantOptions("ternary"), Flavor.CPU, calib.subset(np.arange(64)),
                            None, None)
    after = dict(q.export_model.named_modules())
    for name, packed in before.items():
        assert isinstance(after[name], enn.TernaryLinear) and torch.equal(after[name].ternary_weights()[0], packed)
    assert isinstance(after["lm.lm_head"], TernaryPTQLinear)  # the float head is what --quant ternary adds
    assert list(q.record["layers"]) == ["lm.lm_head"]


def test_qat_checkpoint_from_config_and_save_pretrained(tmp_path):
    config = bitnet_config("autobitlinear", "online")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)  # float weights on disk
    hf = _load(tmp_path, transformers.AutoConfig.from_pretrained(tmp_path))
    assert sum(type(m).__name__ == "AutoBitLinear" for m in hf.modules()) == 2 * LAYERS_PER_BLOCK
    original = LMLogits(hf)
    model = LMLogits(_load(tmp_path, transformers.AutoConfig.from_pretrained(tmp_path)))
    conversion = verify(original, convert(model), {"input_ids": markov()[2].input()[:32]}, atol=1e-4)
    assert max(conversion.checks["modules"].values()) <= 1e-5
    layers = [m for m in model.modules() if isinstance(m, enn.TernaryLinear)]
    assert len(layers) == 2 * LAYERS_PER_BLOCK and not any(m.fixed_scale for m in layers)  # absmean, as online
