"""Functional-op sites: which call of ``x + y``, ``torch.cat``, ``F.hardswish``, pooling... is which.

Stage: quantize (DESIGN §5). Input: a model's eager forward. Output: for every call of a watched torch
function, its :class:`Site` ``(scope, kind, ordinal)``: the innermost module running it (its path),
the op kind, and how many calls of that kind ran in that scope before it in the same forward.

The same triple names the ONNX node the call becomes: the dynamo exporter records each node's module
scope and FX node name in ``pkg.torch.onnx.name_scopes`` (``['', 'layer1', 'layer1.0', 'add_45']``),
the FX name is the ATen op plus a counter, and nodes of one scope come out in execution order. So the
k-th ``add`` call in module ``layer1.0`` is the k-th node whose scope is ``layer1.0`` and whose FX name
is ``add`` or ``add_<n>`` (``edgegate.onnx_export.passes.insert_op_qdq`` does the matching; it checks that
each scope holds as many nodes of a kind as the forward made calls, and skips the scope otherwise).

:class:`ScopeTracker` keeps the scope stack with global module hooks installed only for the duration of
a forward, so the model itself carries no per-module hooks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum

from torch import nn
from torch.nn.modules import module as torch_module


class OpKind(StrEnum):
    """Functional ops that can run on quantized tensors, and the transparent ops quantization passes through."""

    ADD = "add"  # QLinearAdd
    MUL = "mul"  # QLinearMul (squeeze-excite)
    CAT = "cat"  # QLinearConcat
    AVG_POOL = "avg_pool"  # adaptive / global average pooling, mean over H, W: QLinear(Global)AveragePool
    HARDSWISH = "hardswish"
    HARDSIGMOID = "hardsigmoid"
    MAX_POOL = "max_pool"  # transparent: max commutes with quantization (uint8 MaxPool)
    RELU = "relu"  # transparent, or fused into the quantizer of the op in front of it
    RESHAPE = "reshape"  # transparent: flatten / view / reshape
    DROPOUT = "dropout"  # transparent, and absent from the exported (eval) graph


COMPUTE = frozenset({OpKind.ADD, OpKind.MUL, OpKind.CAT, OpKind.AVG_POOL, OpKind.HARDSWISH, OpKind.HARDSIGMOID})
BINARY = frozenset({OpKind.ADD, OpKind.MUL})

# torch function __name__ -> kind (the mode sees TensorBase.add for `x + y` and add_ for `x += y`).
FUNCTIONS: dict[str, OpKind] = {
    **dict.fromkeys(("add", "add_", "__add__", "__radd__", "__iadd__"), OpKind.ADD),
    **dict.fromkeys(("mul", "mul_", "__mul__", "__rmul__", "__imul__"), OpKind.MUL),
    **dict.fromkeys(("cat", "concat", "concatenate"), OpKind.CAT),
    **dict.fromkeys(("adaptive_avg_pool2d", "avg_pool2d", "mean"), OpKind.AVG_POOL),
    **dict.fromkeys(("hardswish", "hardswish_"), OpKind.HARDSWISH),
    **dict.fromkeys(("hardsigmoid", "hardsigmoid_"), OpKind.HARDSIGMOID),
    **dict.fromkeys(("max_pool2d", "max_pool2d_with_indices"), OpKind.MAX_POOL),
    **dict.fromkeys(("relu", "relu_"), OpKind.RELU),
    **dict.fromkeys(("flatten", "view", "reshape"), OpKind.RESHAPE),
    "dropout": OpKind.DROPOUT,
}

# kind -> the FX node base names (ATen ops after the exporter's decompositions) its calls export as.
FX_NAMES: dict[OpKind, frozenset[str]] = {
    OpKind.ADD: frozenset({"add"}),
    OpKind.MUL: frozenset({"mul"}),
    OpKind.CAT: frozenset({"cat", "concat"}),
    OpKind.AVG_POOL: frozenset({"mean", "avg_pool2d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d"}),
    OpKind.HARDSWISH: frozenset({"hardswish"}),
    OpKind.HARDSIGMOID: frozenset({"hardsigmoid"}),
    OpKind.MAX_POOL: frozenset({"max_pool2d", "max_pool2d_with_indices"}),
    OpKind.RELU: frozenset({"relu"}),
    OpKind.RESHAPE: frozenset({"view", "reshape", "flatten", "_unsafe_view"}),
    OpKind.DROPOUT: frozenset(),
}
_COUNTER = re.compile(r"_\d+$")


def fx_base(fx_name: str) -> str:
    """``add_45`` -> ``add``; ``max_pool2d`` stays (its digits are not a counter)."""
    return _COUNTER.sub("", fx_name)


def kind_of_fx(fx_name: str) -> OpKind | None:
    base = fx_base(fx_name)
    return next((k for k, names in FX_NAMES.items() if base in names), None)


@dataclass(frozen=True, order=True)
class Site:
    scope: str  # module path of the innermost module running the call ('' for the model's own forward)
    kind: OpKind
    ordinal: int  # calls of this kind in this scope before it, in this forward

    @property
    def key(self) -> str:
        return f"{self.scope}:{self.kind}#{self.ordinal}"


class ScopeTracker:
    """Which module is running (its path) during ``root``'s forward, and the site of each watched call.

    ``skip(module)`` marks modules whose insides are not the user's code (quant layers, quantizers): no
    site is counted while one of them runs. ``on_enter(path, module, args)`` / ``on_exit(path, module,
    args, out)`` see every call of a module of ``root``; ``on_exit`` may return a replacement output.
    """

    def __init__(self, root: nn.Module, skip: Callable[[nn.Module], bool],
                 on_enter: Callable | None = None, on_exit: Callable | None = None) -> None:
        self.root = root
        self.skip = skip
        self.on_enter, self.on_exit = on_enter, on_exit
        self._paths: dict[int, str] = {}
        self._stack: list[str] = []
        self._frames: list[tuple[bool, bool]] = []
        self._skipping = 0
        self._counts: dict[tuple[str, OpKind], int] = {}

    @property
    def skipping(self) -> bool:
        return self._skipping > 0

    @property
    def counts(self) -> dict[tuple[str, OpKind], int]:
        """Calls per (scope, kind) of the last forward."""
        return dict(self._counts)

    def site(self, kind: OpKind) -> Site:
        scope = self._stack[-1] if self._stack else ""
        n = self._counts.get((scope, kind), 0)
        self._counts[(scope, kind)] = n + 1
        return Site(scope, kind, n)

    @contextmanager
    def active(self) -> Iterator[ScopeTracker]:
        self._paths = {id(m): p for p, m in self.root.named_modules()}
        self._paths.pop(id(self.root), None)  # the root's own code runs at scope ''
        self._stack, self._frames, self._skipping, self._counts = [], [], 0, {}
        pre = torch_module.register_module_forward_pre_hook(self._pre)
        post = torch_module.register_module_forward_hook(self._post, always_call=True)
        try:
            yield self
        finally:
            pre.remove()
            post.remove()
            self._stack, self._frames, self._skipping = [], [], 0

    def _pre(self, module: nn.Module, args: tuple) -> None:
        path = self._paths.get(id(module))
        outside = not self.skipping  # no skipped module is running around this call
        counted = not outside or self.skip(module)  # every module inside a skipped one counts, to undo in _post
        self._skipping += counted
        # A module outside the model (built on the fly) runs at its caller's scope.
        self._stack.append(path if path is not None else (self._stack[-1] if self._stack else ""))
        self._frames.append((counted, outside and path is not None))
        if outside and path is not None and self.on_enter is not None:
            self.on_enter(path, module, args)

    def _post(self, module: nn.Module, args: tuple, out):
        path = self._stack.pop() if self._stack else ""
        counted, report = self._frames.pop() if self._frames else (False, False)
        self._skipping -= counted
        if report and self.on_exit is not None:
            return self.on_exit(path, module, args, out)
        return None
