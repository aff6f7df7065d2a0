"""Array backends for the custom-op catalog: one op body, three executions.

An op in ``edgegate.ops.catalog`` is written once as ``body(F, *inputs, **attrs)`` against the small
array vocabulary below. Run with ``NUMPY`` it is the numpy reference (the living definition of the
op's semantics), with ``TORCH`` it is the torch forward, and with an ``OnnxBuilder`` it records the
ONNX function body made of standard ops only (``edgegate.ops.onnx_function.OnnxBuilder``), so every
ONNX runtime can execute the op unchanged. This module needs numpy only (torch is imported when a
``TorchBackend`` is made).

Op attributes (``k``, ``scoring`` and ``scale`` of TopKGate, ``in_features`` of TernaryMatMul) reach the
body as :class:`Attr`: its value for numpy/torch, and for ONNX a ``Constant`` that references the calling
node's attribute, so one function body serves every attribute value. Attributes are integers or floats
(:class:`AttrKind`); a body never branches on an attribute in Python (the ONNX body is built once):
it selects with ``choose(flag, if_true, if_false)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np


class AttrKind(StrEnum):
    INT = "int"
    FLOAT = "float"

    def coerce(self, value: Any) -> int | float:
        return int(value) if self is AttrKind.INT else float(value)


@dataclass(frozen=True)
class Attr:
    """An op attribute: ``value`` for eager backends, ``name`` (and ``kind``) for the ONNX function body."""

    name: str
    kind: AttrKind
    value: int | float


class EagerBackend:
    """What the eager backends share: an attribute is its value, and ``choose`` picks in Python (the flag is
    concrete here; the ONNX builder records a ``Where`` instead)."""

    def attr(self, a: Attr) -> int | float:
        return a.kind.coerce(a.value)

    def choose(self, flag, if_true, if_false):
        return if_true if flag else if_false


class NumpyBackend(EagerBackend):
    """Reference semantics. Deliberately plain numpy: this is what faster paths are tested against."""

    def const(self, value: Any, dtype: str) -> np.ndarray:
        return np.asarray(value, dtype=dtype)

    def cast(self, x, dtype: str):
        return np.asarray(x).astype(dtype)

    def cast_like(self, x, like):
        return np.asarray(x).astype(np.asarray(like).dtype)

    # Element-wise arithmetic, comparisons and matmul: numpy's own functions.
    add = staticmethod(np.add)
    sub = staticmethod(np.subtract)
    mul = staticmethod(np.multiply)
    div = staticmethod(np.divide)
    greater = staticmethod(np.greater)
    greater_equal = staticmethod(np.greater_equal)
    matmul = staticmethod(np.matmul)

    def sigmoid(self, x):
        x = np.asarray(x)
        return (1.0 / (1.0 + np.exp(-x))).astype(x.dtype)

    def softmax(self, x):
        x = np.asarray(x)
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(x.dtype)

    def reduce_max(self, x):
        return np.max(x, axis=-1)

    def reduce_sum(self, x):
        return np.sum(x, axis=-1, keepdims=True)

    def argmax_last(self, x):
        return np.argmax(np.asarray(x), axis=-1).astype(np.int64)

    def topk(self, x, k: int):
        # Stable descending order: ties resolve to the lower index, as in ONNX TopK and torch.topk on CPU.
        idx = np.argsort(-np.asarray(x), axis=-1, kind="stable")[..., :k].astype(np.int64)
        return np.take_along_axis(x, idx, axis=-1), idx

    def gather_last(self, x, idx):
        return np.take_along_axis(np.asarray(x), np.asarray(idx).astype(np.int64), axis=-1)

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


class TorchBackend(EagerBackend):
    """The torch forward: differentiable where the math is (gates), integer ops where it is not."""

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def const(self, value: Any, dtype: str):
        return self.torch.tensor(value, dtype=getattr(self.torch, dtype))

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

    def argmax_last(self, x):
        return self.torch.argmax(x, dim=-1)

    def topk(self, x, k: int):
        return self.torch.topk(x, k, dim=-1, largest=True, sorted=True)

    def gather_last(self, x, idx):
        return self.torch.gather(x, -1, idx)

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


NUMPY = NumpyBackend()
