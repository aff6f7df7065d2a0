"""Brevitas quant layers and the activation-quantizer table (QDQ form x observer).

Stage: quantize (DESIGN §5). Input: a float ``nn.Linear`` / ``nn.Conv2d`` and a :class:`QuantConfig`.
Output: the equivalent brevitas layer (int8 per-channel weights, 8-bit per-tensor input quantizer,
int32 bias, float output; a quantized output for a Conv of the asymmetric form) carrying the same weights, ready to
be calibrated.

Forms differ in the activation type: ``asymmetric`` uses uint8 activations (ONNX Runtime on
x86 fuses int8 kernels only with uint8 activations), ``symmetric`` int8 with zero point 0. An
``asymmetric`` Conv also quantizes its output (the same quantizer type, after the bias): ORT x86 has only
``QLinearConv`` (uint8 output) as a fast integer conv and fuses it only in front of a
QuantizeLinear, so a Conv feeding a float op (a gate's Mul, a residual Add) would stay float.
Linear layers need no output quantizer (ORT's ``QGemm``/``MatMulIntegerToFloat`` have float outputs).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from edgegate.quantization.config import Observer, QuantConfig
from edgegate.quantization.plan import QdqForm

with warnings.catch_warnings():
    # brevitas warns at import about an optional CUDA kernel package we never use.
    warnings.filterwarnings("ignore", message=".*fast_hadamard_transform.*")
    import brevitas.nn as qnn
    from brevitas.core.stats import NegativeMinOrZero
    from brevitas.inject.enum import StatsOp
    from brevitas.quant import (
        Int8ActPerTensorFloat,
        Int8ActPerTensorFloatMSE,
        Int8WeightPerChannelFloat,
        Int32Bias,
        ShiftedUint8ActPerTensorFloat,
    )
    from brevitas.quant.shifted_scaled_int import ShiftedUint8ActPerTensorFloatMSE

# brevitas warns on every forward with an asymmetric (cpu) input quantizer that it does not track the
# accumulator's zero point; we never use its output QuantTensor (return_quant_tensor=False).
warnings.filterwarnings("ignore", message="Computing zero point of output accumulator", category=UserWarning)

# Layer types that are swapped, matched exactly: subclasses (e.g. brevitas layers, or the Linear that
# nn.MultiheadAttention reads weights from directly) are not plain layers and are left alone.
QUANTIZABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)

ACT_QUANT = {
    (QdqForm.SYMMETRIC, Observer.MINMAX): Int8ActPerTensorFloat.let(scaling_stats_op=StatsOp.MAX),
    (QdqForm.SYMMETRIC, Observer.PERCENTILE): Int8ActPerTensorFloat.let(high_percentile_q=99.99),
    (QdqForm.SYMMETRIC, Observer.MSE): Int8ActPerTensorFloatMSE,
    (QdqForm.ASYMMETRIC, Observer.MINMAX): ShiftedUint8ActPerTensorFloat.let(
        scaling_stats_op=StatsOp.MIN_MAX, zero_point_stats_impl=NegativeMinOrZero),
    (QdqForm.ASYMMETRIC, Observer.PERCENTILE): ShiftedUint8ActPerTensorFloat.let(
        high_percentile_q=99.99, low_percentile_q=0.01),
    (QdqForm.ASYMMETRIC, Observer.MSE): ShiftedUint8ActPerTensorFloatMSE,
}


def is_quantizable(module: nn.Module) -> bool:
    return type(module) in QUANTIZABLE


class EmptySafeQuantLinear(qnn.QuantLinear):
    """``brevitas.nn.QuantLinear`` that passes an empty batch through as the float op.

    Under compaction (early exit) or sparse dispatch a layer can receive zero rows; brevitas'
    statistics crash on an empty tensor, and there is nothing to quantize anyway.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return F.linear(x, self.weight, self.bias)
        return super().forward(x)


class EmptySafeQuantConv2d(qnn.QuantConv2d):
    """``brevitas.nn.QuantConv2d`` that passes an empty batch through as the float op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return super().forward(x)


def quantizes_output(module: nn.Module, qdq_form: QdqForm) -> bool:
    """Whether the quant layer of ``module`` has an output quantizer: Convs of the ``asymmetric`` form."""
    return isinstance(module, nn.Conv2d) and qdq_form is QdqForm.ASYMMETRIC


def quant_layer(module: nn.Module, config: QuantConfig, act_bits: int = 8, output: bool = True) -> nn.Module:
    """A fresh (uncalibrated) brevitas layer with ``module``'s weights, device and dtype.

    ``act_bits=16`` quantizes the input to 16 bits (A16W8: same observer, 65536 levels), for layers
    whose rounding error flips gate decisions; the cpu lowering runs them on 8-bit integer kernels.
    ``output=False`` leaves out the output quantizer of a cpu Conv whose ReLU takes it over
    (``edgegate.quantization.layout``: the quantizer then sits after the ReLU, zero point 0).
    """
    has_bias = module.bias is not None
    act = ACT_QUANT[(config.qdq_form, config.observer)]
    # 8-bit: A16W8 is for Linear layers only
    out = act if output and quantizes_output(module, config.qdq_form) else None
    if act_bits != 8:
        act = act.let(bit_width=act_bits)
    kw = {"bias": has_bias, "weight_quant": Int8WeightPerChannelFloat,
          "input_quant": act,
          "bias_quant": Int32Bias if has_bias else None, "output_quant": out, "return_quant_tensor": False}
    if isinstance(module, nn.Conv2d):
        q: nn.Module = EmptySafeQuantConv2d(
            module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
            padding=module.padding, dilation=module.dilation, groups=module.groups,
            padding_mode=module.padding_mode, **kw)
    else:
        q = EmptySafeQuantLinear(module.in_features, module.out_features, **kw)
    # load_state_dict is strict about brevitas' own buffers: set the parameters instead. The weight shares the
    # float layer's storage (calibration writes biases, never weights): a quantized model costs no second copy.
    with torch.no_grad():
        q.weight.set_(module.weight.detach())
        if has_bias:
            q.bias.copy_(module.bias)
    return q.to(device=module.weight.device, dtype=module.weight.dtype).train(module.training)
