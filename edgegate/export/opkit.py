"""Array backends for the custom-op catalog: one op body, three executions.

An op in ``edgegate.export.ops`` is written once as ``body(F, *inputs, **attrs)`` against the small
array vocabulary below. Run with ``NUMPY`` it is the numpy reference (the living definition of the
op's semantics), with ``TORCH`` it is the torch forward, and with an ``OnnxBuilder`` it records the
ONNX function body made of standard ops only, so every ONNX runtime can execute the op unchanged.

Integer attributes (``k`` of TopKGate, ``in_features`` of TernaryMatMul) reach the body as
``AttrInt``: a plain int for numpy/torch and a reference to the function attribute for ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ONNX_OPSET = 20  # function bodies must use the model's default opset


@dataclass(frozen=True)
class AttrInt:
    """An integer op attribute: ``value`` for eager backends, ``name`` for the ONNX function body."""

    name: str
    value: int


_DTYPES = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "int8": TensorProto.INT8,
           "uint8": TensorProto.UINT8, "bool": TensorProto.BOOL}


class NumpyBackend:
    """Reference semantics. Deliberately plain numpy: this is what faster paths are tested against."""

    def const(self, value: Any, dtype: str) -> np.ndarray:
        return np.asarray(value, dtype=dtype)

    def attr(self, a: AttrInt) -> int:
        return int(a.value)

    def cast(self, x, dtype: str):
        return np.asarray(x).astype(dtype)

    def cast_like(self, x, like):
        return np.asarray(x).astype(np.asarray(like).dtype)

    def add(self, a, b):
        return np.add(a, b)

    def sub(self, a, b):
        return np.subtract(a, b)

    def mul(self, a, b):
        return np.multiply(a, b)

    def div(self, a, b):
        return np.divide(a, b)

    def sigmoid(self, x):
        x = np.asarray(x)
        return (1.0 / (1.0 + np.exp(-x))).astype(x.dtype)

    def softmax(self, x):
        x = np.asarray(x)
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(x.dtype)

    def greater(self, a, b):
        return np.greater(a, b)

    def greater_equal(self, a, b):
        return np.greater_equal(a, b)

    def reduce_max(self, x):
        return np.max(x, axis=-1)

    def reduce_sum(self, x):
        return np.sum(x, axis=-1, keepdims=True)

    def topk(self, x, k: int):
        # Stable descending order: ties resolve to the lower index, as in ONNX TopK and torch.topk on CPU.
        idx = np.argsort(-np.asarray(x), axis=-1, kind="stable")[..., :k].astype(np.int64)
        return np.take_along_axis(x, idx, axis=-1), idx

    def matmul(self, a, b):
        return np.matmul(a, b)

    def transpose(self, x):
        return np.swapaxes(x, -1, -2)

    def shift_right(self, x, bits: int):
        return np.right_shift(x, np.uint8(bits))

    def bit_and(self, x, mask: int):
        return np.bitwise_and(x, np.uint8(mask))

    def stack_last(self, xs):
        return np.stack(xs, axis=-1)

    def flatten_last2(self, x):
        return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])

    def slice_last(self, x, n: int):
        return x[..., :n]

    def take(self, table, idx):
        return np.take(table, np.asarray(idx).astype(np.int64), axis=0)

    def dequantize_rows(self, w_int8, scale):
        return np.asarray(w_int8).astype(np.float32) * np.asarray(scale, np.float32).reshape(-1, 1)


class TorchBackend:
    """The torch forward: differentiable where the math is (gates), integer ops where it is not."""

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def const(self, value: Any, dtype: str):
        return self.torch.tensor(value, dtype=getattr(self.torch, dtype))

    def attr(self, a: AttrInt) -> int:
        return int(a.value)

    def cast(self, x, dtype: str):
        return x.to(getattr(self.torch, dtype))

    def cast_like(self, x, like):
        return x.to(like.dtype)

    def add(self, a, b):
        return a + b

    def sub(self, a, b):
        return a - b

    def mul(self, a, b):
        return a * b

    def div(self, a, b):
        return a / b

    def sigmoid(self, x):
        return self.torch.sigmoid(x)

    def softmax(self, x):
        return self.torch.softmax(x, dim=-1)

    def greater(self, a, b):
        return self.torch.gt(a, b)

    def greater_equal(self, a, b):
        return self.torch.ge(a, b)

    def reduce_max(self, x):
        return x.amax(dim=-1)

    def reduce_sum(self, x):
        return x.sum(dim=-1, keepdim=True)

    def topk(self, x, k: int):
        return self.torch.topk(x, k, dim=-1, largest=True, sorted=True)

    def matmul(self, a, b):
        return a @ b

    def transpose(self, x):
        return x.transpose(-1, -2)

    def shift_right(self, x, bits: int):
        return self.torch.bitwise_right_shift(x, bits)

    def bit_and(self, x, mask: int):
        return self.torch.bitwise_and(x, mask)

    def stack_last(self, xs):
        return self.torch.stack(xs, dim=-1)

    def flatten_last2(self, x):
        return x.flatten(-2)

    def slice_last(self, x, n: int):
        return x[..., :n]

    def take(self, table, idx):
        return table.to(idx.device)[idx.long()]

    def dequantize_rows(self, w_int8, scale):
        return w_int8.to(self.torch.float32) * scale.to(self.torch.float32).reshape(-1, 1)


class OnnxBuilder:
    """Records a body as ONNX nodes (standard domain only) for a model-local FunctionProto."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def _fresh(self, hint: str) -> str:
        self._n += 1
        return f"_{hint}{self._n}"

    def _node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> Any:
        outs = [self._fresh(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, **attrs))
        return outs[0] if n_out == 1 else tuple(outs)

    def _ints(self, values: list[int]) -> str:
        return self.const(values, "int64")

    def const(self, value: Any, dtype: str) -> str:
        arr = np.asarray(value, dtype=dtype)
        return self._node("Constant", [], value=numpy_helper.from_array(arr))

    def attr(self, a: AttrInt) -> str:
        # A scalar int64 tensor whose value is the calling node's attribute.
        out = self._fresh("attr")
        node = helper.make_node("Constant", [], [out])
        node.attribute.append(helper.make_attribute_ref("value_int", onnx.AttributeProto.INT))
        node.attribute[-1].ref_attr_name = a.name
        self.nodes.append(node)
        return out

    def cast(self, x, dtype: str):
        return self._node("Cast", [x], to=_DTYPES[dtype])

    def cast_like(self, x, like):
        return self._node("CastLike", [x, like])

    def add(self, a, b):
        return self._node("Add", [a, b])

    def sub(self, a, b):
        return self._node("Sub", [a, b])

    def mul(self, a, b):
        return self._node("Mul", [a, b])

    def div(self, a, b):
        return self._node("Div", [a, b])

    def sigmoid(self, x):
        return self._node("Sigmoid", [x])

    def softmax(self, x):
        return self._node("Softmax", [x], axis=-1)

    def greater(self, a, b):
        return self._node("Greater", [a, b])

    def greater_equal(self, a, b):
        return self._node("GreaterOrEqual", [a, b])

    def reduce_max(self, x):
        return self._node("ReduceMax", [x, self._ints([-1])], keepdims=0)

    def reduce_sum(self, x):
        return self._node("ReduceSum", [x, self._ints([-1])], keepdims=1)

    def topk(self, x, k):
        k1 = self._node("Reshape", [k, self._ints([1])])
        return self._node("TopK", [x, k1], n_out=2, axis=-1, largest=1, sorted=1)

    def matmul(self, a, b):
        return self._node("MatMul", [a, b])

    def transpose(self, x):
        # Function inputs have unknown rank; callers only transpose 2-D weights.
        return self._node("Transpose", [x], perm=[1, 0])

    def shift_right(self, x, bits: int):
        return self._node("BitShift", [x, self.const(bits, "uint8")], direction="RIGHT")

    def bit_and(self, x, mask: int):
        return self._node("BitwiseAnd", [x, self.const(mask, "uint8")])

    def stack_last(self, xs):
        return self._node("Concat", [self._node("Unsqueeze", [x, self._ints([-1])]) for x in xs], axis=-1)

    def flatten_last2(self, x):
        # [N, M, 4] -> [N, 4M]: 2-D weights only (the packed-ternary layout).
        return self._node("Reshape", [x, self._ints([0, -1])])

    def slice_last(self, x, n):
        n1 = self._node("Reshape", [n, self._ints([1])])
        return self._node("Slice", [x, self._ints([0]), n1, self._ints([-1])])

    def take(self, table, idx):
        return self._node("Gather", [table, self.cast(idx, "int64")], axis=0)

    def dequantize_rows(self, w_int8, scale):
        # Per-output-channel DequantizeLinear: the form TensorRT needs to see in front of a MatMul.
        return self._node("DequantizeLinear", [w_int8, scale], axis=0)


NUMPY = NumpyBackend()
