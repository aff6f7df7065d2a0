"""The ONNX side of the op catalog: each op's model-local FunctionProto, its OpSchema, and the
dynamo exporter's translation of the torch custom op into one ``edgegate`` node.

Input: ``edgegate.ops.catalog`` entries. Output: ONNX functions recorded by running each op's body on
an :class:`OnnxBuilder` (standard ops only, default opset ``ONNX_OPSET``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgegate.ops.backends import Attr, AttrKind
from edgegate.ops.catalog import CATALOG, DOMAIN, DOMAIN_VERSION, TYPE_CONSTRAINTS, AttrDef

ONNX_OPSET = 20  # function bodies must use the model's default opset

_ATTR_FIELDS = {AttrKind.INT: ("value_int", onnx.AttributeProto.INT),
                AttrKind.FLOAT: ("value_float", onnx.AttributeProto.FLOAT)}
_DTYPES = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "int8": TensorProto.INT8,
           "uint8": TensorProto.UINT8, "bool": TensorProto.BOOL}


def _one_node(op: str, **attrs: Any) -> Callable[..., str]:
    """An :class:`OnnxBuilder` method recording one ``op`` node (with ``attrs``) of its arguments."""

    def method(self: OnnxBuilder, *inputs: str) -> str:
        return self._node(op, list(inputs), **attrs)

    return method


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

    def attr(self, a: Attr) -> str:
        # A scalar tensor (int64 or float32) whose value is the calling node's attribute.
        out = self._fresh("attr")
        node = helper.make_node("Constant", [], [out])
        field, kind = _ATTR_FIELDS[a.kind]
        node.attribute.append(helper.make_attribute_ref(field, kind))
        node.attribute[-1].ref_attr_name = a.name
        self.nodes.append(node)
        return out

    # The ops that are one standard node of their inputs, in argument order.
    add = _one_node("Add")
    sub = _one_node("Sub")
    mul = _one_node("Mul")
    div = _one_node("Div")
    sigmoid = _one_node("Sigmoid")
    softmax = _one_node("Softmax", axis=-1)
    greater = _one_node("Greater")
    greater_equal = _one_node("GreaterOrEqual")
    argmax_last = _one_node("ArgMax", axis=-1, keepdims=0, select_last_index=0)
    matmul = _one_node("MatMul")
    cast_like = _one_node("CastLike")

    def choose(self, flag, if_true, if_false):
        # The function body is built once for every attribute value: select at run time.
        return self._node("Where", [self.cast(flag, "bool"), if_true, if_false])

    def gather_last(self, x, idx):
        # Router scores are 2-D [T, E]; axis 1 rather than -1, which onnx.reference mishandles for GatherElements.
        return self._node("GatherElements", [x, idx], axis=1)

    def cast(self, x, dtype: str):
        return self._node("Cast", [x], to=_DTYPES[dtype])










    def reduce_max(self, x):
        return self._node("ReduceMax", [x, self._ints([-1])], keepdims=0)

    def reduce_sum(self, x):
        return self._node("ReduceSum", [x, self._ints([-1])], keepdims=1)


    def topk(self, x, k):
        k1 = self._node("Reshape", [k, self._ints([1])])
        return self._node("TopK", [x, k1], n_out=2, axis=-1, largest=1, sorted=1)


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



@cache
def function_proto(op_type: str) -> onnx.FunctionProto:
    """The op's model-local ONNX function (standard ops, default opset ``ONNX_OPSET``)."""
    op = CATALOG[op_type]
    b = OnnxBuilder()
    in_names = [n for n, _ in op.inputs]
    out = op.body(b, *in_names, **{a.name: Attr(a.name, a.kind, 0) for a in op.attrs})
    outs = out if isinstance(out, tuple) else (out,)
    for value, (name, _) in zip(outs, op.outputs, strict=True):
        b.nodes.append(helper.make_node("Identity", [value], [name]))
    # Attributes with a default are declared with it (a node that omits one still runs); the others by name.
    required = [a.name for a in op.attrs if a.default is None]
    defaults = [helper.make_attribute(a.name, a.kind.coerce(a.default)) for a in op.attrs if a.default is not None]
    return helper.make_function(
        DOMAIN, op.name, in_names, [n for n, _ in op.outputs], b.nodes,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)], attributes=required, attribute_protos=defaults,
        doc_string=op.doc,
    )


def _schema_attribute(a: AttrDef) -> onnx.defs.OpSchema.Attribute:
    schema = onnx.defs.OpSchema
    if a.default is None:
        kind = schema.AttrType.INT if a.kind is AttrKind.INT else schema.AttrType.FLOAT
        return schema.Attribute(a.name, kind, a.name)
    return schema.Attribute(a.name, helper.make_attribute(a.name, a.kind.coerce(a.default)), a.name)


def register_onnx_schemas() -> None:
    """Register each op's OpSchema so onnx shape inference and onnxscript know its signature."""
    from onnx import defs

    for op in CATALOG.values():
        if defs.has(op.name, DOMAIN):
            continue
        used = sorted({t for _, t in op.inputs + op.outputs})
        schema = defs.OpSchema(
            op.name, DOMAIN, DOMAIN_VERSION, doc=op.doc,
            inputs=[defs.OpSchema.FormalParameter(n, t) for n, t in op.inputs],
            outputs=[defs.OpSchema.FormalParameter(n, t) for n, t in op.outputs],
            type_constraints=[(t, TYPE_CONSTRAINTS[t], "") for t in used],
            attributes=[_schema_attribute(a) for a in op.attrs],
        )
        defs.register_schema(schema)


def onnx_translation_table() -> dict:
    """Exporter translations: each custom op becomes one node of the ``edgegate`` domain."""
    # torch and onnxscript only here: function_proto and the schemas serve ONNX passes without torch.
    import torch
    from onnxscript.values import Opset

    from edgegate.ops.torch_ops import torch_backend  # the torch side of the ops, for the same reason

    torch_backend()
    register_onnx_schemas()
    opset = Opset(DOMAIN, DOMAIN_VERSION)
    table = {}
    for op in CATALOG.values():

        def translate(*args, _op=op, **kwargs):
            n_in = len(_op.inputs)
            given = dict(zip([a.name for a in _op.attrs], args[n_in:], strict=False)) | kwargs
            # Every attribute is written on the node, defaults included, so the graph says what it computes.
            attrs = {name: a.value for name, a in _op.attr_values(given).items()}
            return getattr(opset, _op.name)(*args[:n_in], **attrs)

        types = {a.name: int if a.kind is AttrKind.INT else float for a in op.attrs}
        params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n, _ in op.inputs]
        params += [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=types[a.name])
                   for a in op.attrs]
        translate.__signature__ = inspect.Signature(params)
        translate.__annotations__ = dict(types)
        translate.__name__ = op.name
        table[getattr(torch.ops.edgegate, op.torch_name).default] = translate
    return table
