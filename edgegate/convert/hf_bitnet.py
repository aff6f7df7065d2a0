"""Converter family: BitNet b1.58 layers of ``transformers`` -> ``edgegate.nn.TernaryLinear`` (gate kind ternary).

Stage: convert (DESIGN §10). Input: a ``transformers.integrations.bitnet`` layer, as ``from_pretrained``
builds it for a config whose ``quantization_config`` has ``quant_method: bitnet``:

* ``BitLinear`` (``linear_class: bitlinear``, the packed checkpoints such as bitnet-b1.58-2B-4T): a
  uint8 buffer ``weight`` [out/4, in] holding 4 ternary codes per byte *along the output dimension*
  (code + 1 in bits 2i..2i+1 of row j is output row i * out/4 + j) and ``weight_scale`` [1]; it computes
  ``round(x * s) @ codes^T / (s * weight_scale)`` with the per-token absmax scale ``s = 127 / max|x|``.
* ``AutoBitLinear`` offline (``weight`` holds the codes, ``weight_scale`` [1]): ``(x_q @ codes^T + b) *
  weight_scale``; online (``weight`` is float): absmean ternarization of ``weight`` at run time.

Output: a ``TernaryLinear`` with the checkpoint's own codes and scale (``TernaryLinear.from_codes``; the
scale is ``1 / weight_scale`` for ``BitLinear``), or, for online ``AutoBitLinear``, the float weight with
the same absmean rule. Its eval forward is the same arithmetic: per-token 8-bit absmax activations
(``quantize_activations``, the same formula and clamp) and the ``TernaryMatMul`` op on the 2-bit
packed codes, so the exported ONNX stores 2 bits per weight. An optional input RMSNorm stays in front.
Nothing here imports ``transformers``.
"""

from __future__ import annotations

import torch
from torch import nn

from edgegate.convert.registry import register
from edgegate.errors import ExportError
from edgegate.gates import GateKind
from edgegate.nn import TernaryLinear

_BITNET = "transformers.integrations.bitnet"


def unpack_bitlinear(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """BitLinear's uint8 [ceil(out/4), in] packing -> codes {-1, 0, 1} float32 [out, in]."""
    # Bits 2i..2i+1 of every packed row form the i-th block of out/4 output rows.
    parts = [((packed.to(torch.int16) >> (2 * i)) & 3) for i in range(4)]
    return (torch.cat(parts, dim=0)[:out_features] - 1).float()


def _with_norm(module: nn.Module, layer: TernaryLinear) -> nn.Module:
    # BitNet's optional per-layer RMSNorm on the activations before quantization stays where it was.
    norm = getattr(module, "rms_norm", None)
    return layer if norm is None else nn.Sequential(norm, layer)


def _scalar_scale(module: nn.Module) -> torch.Tensor:
    scale = module.weight_scale.detach().float().reshape(-1)
    if scale.numel() != 1:
        raise ExportError(f"{type(module).__name__} [{module.out_features}x{module.in_features}] has "
                          f"{scale.numel()} weight scales; edgegate's TernaryMatMul takes one per tensor")
    return scale[0]


def convert_bitlinear(module: nn.Module) -> tuple[nn.Module, str]:
    if module.weight.dtype != torch.uint8:
        raise ExportError(f"BitLinear [{module.out_features}x{module.in_features}] holds {module.weight.dtype} "
                          "weights, not packed uint8 codes; re-save the checkpoint from BitNet training")
    codes = unpack_bitlinear(module.weight.detach(), module.out_features)
    scale = _scalar_scale(module)
    layer = TernaryLinear.from_codes(codes, 1.0 / scale, getattr(module, "bias", None))
    return _with_norm(module, layer).train(module.training), str(GateKind.TERNARY)


def convert_autobitlinear(module: nn.Module) -> tuple[nn.Module, str]:
    weight = module.weight.detach().float()
    if module.online_quant:  # the float weight is ternarized by absmean at run time: TernaryLinear's own rule
        layer = TernaryLinear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if module.bias is not None:
                layer.bias.copy_(module.bias.detach().float())
        return _with_norm(module, layer.eval()).train(module.training), str(GateKind.TERNARY)
    if not torch.isin(weight, torch.tensor([-1.0, 0.0, 1.0])).all():
        raise ExportError(f"AutoBitLinear [{module.out_features}x{module.in_features}] is in offline mode but its "
                          "weights are not ternary codes (a checkpoint saved from float weights); load it with "
                          "quantization_mode 'online' or save the BitNet-quantized weights")
    scale = _scalar_scale(module)
    bias = None if module.bias is None else module.bias.detach().float() * scale  # the scale multiplies the bias too
    layer = TernaryLinear.from_codes(weight, scale, bias)
    return _with_norm(module, layer).train(module.training), str(GateKind.TERNARY)


register(f"{_BITNET}:BitLinear", convert_bitlinear, family=str(GateKind.TERNARY), architecture="BitNet b1.58",
         becomes="TernaryLinear with the checkpoint's codes and scale (1 / weight_scale); TernaryMatMul, 2 bits/weight",
         notes="linear_class bitlinear (packed uint8 checkpoints)")
register(f"{_BITNET}:AutoBitLinear", convert_autobitlinear, family=str(GateKind.TERNARY),
         architecture="BitNet b1.58", becomes="TernaryLinear; TernaryMatMul, 2 bits/weight",
         notes="offline: the checkpoint's codes and weight_scale; online: absmean ternarization of the float weight")
