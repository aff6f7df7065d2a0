"""The quantized copy of a model shares its float weights: calibration holds one copy of them, and leaves them as
they were (bias correction writes the quantized layers' own biases)."""

from __future__ import annotations

import torch

from edgegate import zoo
from edgegate.calibration.collect import calibrate_once
from edgegate.quantization import QdqForm, QuantConfig, quantize
from edgegate.quantization.layers import EmptySafeQuantLinear


def test_quantized_layers_share_weights_not_biases_and_float_model_is_unchanged() -> None:
    torch.manual_seed(0)
    model = zoo.build("moe").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = zoo.example_inputs("moe", 64)[0]
    qmodel, swapped = quantize(model, QuantConfig(qdq_form=QdqForm.ASYMMETRIC))
    assert len(swapped) == 14
    for path, q in swapped.items():
        f = model.get_submodule(path)
        assert isinstance(q, EmptySafeQuantLinear) and q.weight.data_ptr() == f.weight.data_ptr()
        assert q.bias is None or q.bias.data_ptr() != f.bias.data_ptr()
    config = QuantConfig(qdq_form=QdqForm.ASYMMETRIC, bias_correction=True, fidelity_target=0.0)
    calibrated, record = calibrate_once(model, x, config)
    assert record.bias_corrections and max(abs(v) for v in record.bias_corrections.values()) > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    corrected = next(p for p, v in record.bias_corrections.items() if v != 0)
    assert not torch.equal(calibrated.get_submodule(corrected).bias, model.get_submodule(corrected).bias)
