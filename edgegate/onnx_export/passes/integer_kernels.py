"""Quantized Linear layers as explicit integer matmuls (``MatMulInteger``), for the ``asymmetric`` form.

Two cases where the QDQ form would leave a float ``Gemm`` on ONNX Runtime x86:

1. An 8-bit Linear that ORT's optimizer does not fuse (e.g. DQ -> Gemm -> Relu into float
   consumers). Written as QuantizeLinear -> MatMulInteger -> Cast -> Mul -> Add it is the same
   arithmetic (uint8 x int8, int32 accumulate, float rescale) on integer kernels. (Convs are not
   rewritten: ``ConvInteger`` is ORT's slow path; a cpu Conv has an output quantizer, so ORT
   fuses it into ``QLinearConv``.)
2. A16W8 Linear layers (``act_bits == 16``): decision-critical
layers whose 8-bit input rounding would flip an exit decision (``edgegate.calibration`` promotes
them). ONNX Runtime has no 16-bit integer matmul, and a uint16 QuantizeLinear -> DequantizeLinear
would leave the layer as a float MatMul. Instead the 16-bit code ``q`` is split into two bytes,
``q = 256 * hi + lo``, each multiplied with the int8 weight by ``MatMulInteger`` (int32 accumulate):

    q   = clip(round(x / s) + z, 0, 65535)                       (float ops, exact below 2^24)
    acc = 256 * (hi @ W^T) + (lo @ W^T) - z * colsum(W)          (two uint8 x int8 integer matmuls)
    y   = acc * (s * w_scale[c]) + round(b / (s * w_scale[c])) * s * w_scale[c]

which is brevitas' 16-bit fake-quant layer (QuantLinear with a 16-bit input quantizer, per-channel
int8 weights, Int32Bias) up to float32 rounding of the products. The layer costs two integer
matmuls instead of one; only the layers in front of a gate decision are promoted.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from edgegate.errors import ExportError
from edgegate.onnx_export.passes._graph import replace_node
from edgegate.quantization.plan import LayerQuant

A16_MAX = 65535


# The name suffixes ``lower_integer`` gives a layer's nodes and initializers, by role: ``insert_qdq`` names
# them ``PATH.SUFFIX``, and ``float_regions`` finds a lowered layer again by them (``lowered_names``).
SUFFIX = {"weight": "weight_quantized", "output_scale": "output_scale", "input_scale": "input_scale",
          "bias": "bias_rounded", "input_quantized": "input_quantized", "a16_div": "a16_div", "output": "output"}


def lowered_names(path: str) -> dict[str, str]:
    """The names of layer ``path``'s lowered nodes and initializers, by role (``SUFFIX``), and its ``path``."""
    return {"path": path, **{role: f"{path}.{suffix}" for role, suffix in SUFFIX.items()}}


def lower_integer(q: LayerQuant, graph: onnx.GraphProto, node: onnx.NodeProto,
                  fresh: Callable[[str], str], init: Callable[[str, np.ndarray], str],
                  bias_on_grid: np.ndarray | None) -> None:
    """Replace ``node`` (Gemm x @ W^T + b, or MatMul x @ W^T) by integer matmuls, in place: one
    uint8 x int8 ``MatMulInteger`` for an 8-bit input, two byte-sliced ones for a 16-bit input.

    ``bias_on_grid``: the Gemm bias as Int32Bias float values (None: no bias, or a MatMul whose bias
    Add the caller rounds).
    """
    top = A16_MAX if q.act_bits == 16 else 255
    if q.act_bits not in (8, 16) or q.act_signed or not 0 <= q.act_zero_point <= top:
        raise ExportError(f"layer {q.name}: the integer lowering needs an unsigned 8- or 16-bit activation, the "
                          f"plan has {q.act_bits} bits, signed={q.act_signed}, zero point {q.act_zero_point}")
    w = q.weight_int.astype(np.int8)
    w_scale = np.broadcast_to(np.asarray(q.weight_scale, np.float32).reshape(-1), (w.shape[0],))
    nodes: list[onnx.NodeProto] = []

    def op(op_type: str, inputs: list[str], suffix: str, **attrs) -> str:
        y = fresh(suffix)
        nodes.append(helper.make_node(op_type, inputs, [y], name=y, **attrs))
        return y

    s = init(SUFFIX["input_scale"], np.float32(q.act_scale))
    if node.op_type not in ("Gemm", "MatMul"):
        raise ExportError(f"layer {q.name}: integer lowering is for Linear layers (Gemm/MatMul), not {node.op_type}")
    w_t = init(SUFFIX["weight"], np.ascontiguousarray(w.T))  # [K, N] for x @ W^T
    if q.act_bits == 8:
        zp = init("input_zero_point", np.uint8(q.act_zero_point))
        xq = op("QuantizeLinear", [node.input[0], s, zp], SUFFIX["input_quantized"])
        acc = op("Cast", [op("MatMulInteger", [xq, w_t, zp], "matmul_integer")], "accumulator",
                 to=onnx.TensorProto.FLOAT)
        _finish(q, graph, node, nodes, op, fresh, init, acc, w_scale, bias_on_grid)
        return
    code = op("Div", [node.input[0], s], SUFFIX["a16_div"])
    code = op("Add", [op("Round", [code], "a16_round"), init("input_zero_point", np.float32(q.act_zero_point))],
              "a16_shift")
    code = op("Clip", [code, init("a16_min", np.float32(0)), init("a16_max", np.float32(A16_MAX))], "a16_code")
    byte = init("a16_byte", np.float32(256))
    hi = op("Floor", [op("Div", [code, byte], "a16_hi_div")], "a16_hi_float")
    lo = op("Sub", [code, op("Mul", [hi, byte], "a16_hi_times_256")], "a16_lo_float")
    hi = op("Cast", [hi], "a16_hi", to=onnx.TensorProto.UINT8)
    lo = op("Cast", [lo], "a16_lo", to=onnx.TensorProto.UINT8)
    acc_hi = op("Cast", [op("MatMulInteger", [hi, w_t], "a16_matmul_hi")], "a16_acc_hi", to=onnx.TensorProto.FLOAT)
    acc_lo = op("Cast", [op("MatMulInteger", [lo, w_t], "a16_matmul_lo")], "a16_acc_lo", to=onnx.TensorProto.FLOAT)
    acc = op("Add", [op("Mul", [acc_hi, byte], "a16_acc_hi_scaled"), acc_lo], "a16_acc")
    zero_term = np.float32(q.act_zero_point) * w.astype(np.float32).sum(axis=1)
    acc = op("Sub", [acc, init("a16_zero_point_term", zero_term.astype(np.float32))], "a16_acc_centered")
    _finish(q, graph, node, nodes, op, fresh, init, acc, w_scale, bias_on_grid)


def _finish(q: LayerQuant, graph: onnx.GraphProto, node: onnx.NodeProto, nodes: list[onnx.NodeProto], op, fresh,
            init, acc: str, w_scale: np.ndarray, bias_on_grid: np.ndarray | None) -> None:
    """acc * (act_scale * w_scale) (+ bias) into ``node``'s output; swap ``node`` for ``nodes``."""
    out_scale = init(SUFFIX["output_scale"], (np.float32(q.act_scale) * w_scale).astype(np.float32))
    if bias_on_grid is None:
        nodes.append(helper.make_node("Mul", [acc, out_scale], [node.output[0]], name=fresh(SUFFIX["output"])))
    else:
        y = op("Mul", [acc, out_scale], "scaled")
        nodes.append(helper.make_node("Add", [y, init(SUFFIX["bias"], bias_on_grid)], [node.output[0]],
                                      name=fresh(SUFFIX["output"])))
    replace_node(graph, node, nodes)
