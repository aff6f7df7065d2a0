"""The torch side of the op catalog: each op as ``torch.ops.edgegate.<name>`` and a python wrapper.

Modules in ``edgegate.nn`` call the wrappers at the bottom (``sigmoid_gate(x, g)`` ...). In training
(gradients needed) a wrapper runs the op's body on torch directly so autograd flows; in inference and
under ``torch.export`` it calls the custom op, so exported graphs keep the op's name.
"""

from __future__ import annotations

from edgegate.ops.backends import AttrKind, TorchBackend
from edgegate.ops.catalog import CATALOG, DOMAIN, OpDef, Scoring

_TORCH: TorchBackend | None = None


def torch_backend() -> TorchBackend:
    global _TORCH
    if _TORCH is None:
        _TORCH = TorchBackend()
        _register_torch_ops()
    return _TORCH


_SCHEMA_TYPES = {AttrKind.INT: "int", AttrKind.FLOAT: "float"}


def _torch_schema(op: OpDef) -> str:
    # Attributes are positional after the tensors, in catalog order; call() always passes all of them.
    args = [f"Tensor {n}" for n, _ in op.inputs] + [f"{_SCHEMA_TYPES[a.kind]} {a.name}" for a in op.attrs]
    outs = "Tensor" if len(op.outputs) == 1 else "(" + ", ".join("Tensor" for _ in op.outputs) + ")"
    return f"({', '.join(args)}) -> {outs}"


def _register_torch_ops() -> None:
    import torch

    for op in CATALOG.values():

        def impl(*args, _op=op):
            tensors, attr_vals = args[: len(_op.inputs)], args[len(_op.inputs):]
            attrs = _op.attr_values({a.name: v for a, v in zip(_op.attrs, attr_vals, strict=True)})
            out = _op.body(_TORCH, *tensors, **attrs)
            # custom_op outputs may not alias inputs; contiguous() also materializes broadcasts.
            return tuple(o.contiguous().clone() for o in out) if isinstance(out, tuple) else out.clone()

        custom = torch.library.custom_op(f"{DOMAIN}::{op.torch_name}", impl, mutates_args=(),
                                         schema=_torch_schema(op))
        custom.register_fake(impl)


def _needs_grad(tensors) -> bool:
    import torch

    return torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in tensors)


def call(op_type: str, *tensors, **attrs: int | float):
    """Run an op from torch: autograd-friendly body in training, the named custom op otherwise.
    Attributes not given take their catalog defaults."""
    import torch

    op = CATALOG[op_type]
    backend = torch_backend()
    values = op.attr_values(attrs)
    if not torch.compiler.is_exporting() and _needs_grad(tensors):
        return op.body(backend, *tensors, **values)
    return getattr(torch.ops.edgegate, op.torch_name)(*tensors, *[values[a.name].value for a in op.attrs])


def sigmoid_gate(x, g):
    return call("SigmoidGate", x, g)


def threshold_gate(h, tau, gain):
    return call("ThresholdGate", h, tau, gain)


def channel_gate(x, mask_logits):
    return call("ChannelGate", x, mask_logits)


def topk_gate(logits, k: int, bias=None, scoring: Scoring | str = Scoring.SOFTMAX, renormalize: bool = True,
              scale: float = 1.0, skip_importance: float = 1.0, skip_threshold: float = 0.0):
    """Router top-k (see the catalog's TopKGate). ``bias`` [E] (score correction; zeros when None) only
    steers the choice of experts; a slot with ``skip_importance * weight < skip_threshold`` gets weight 0."""
    import torch

    if bias is None:
        bias = logits.new_zeros(logits.shape[-1], dtype=torch.float32)
    return call("TopKGate", logits, bias, k=k, scoring=Scoring(scoring).code, renormalize=int(renormalize), scale=scale,
                skip_importance=skip_importance, skip_threshold=skip_threshold)


def learner_count(logits):
    """How many learners each token of an ACM runs: argmax of the gate logits [T, N+1] -> int64 [T]."""
    return call("LearnerCount", logits)


def exit_decision(logits, threshold):
    return call("ExitDecision", logits, threshold)


def learned_exit_decision(gate_logit, threshold):
    return call("LearnedExitDecision", gate_logit, threshold)


def ternary_matmul(x, packed_w, scale, in_features: int):
    return call("TernaryMatMul", x, packed_w, scale, in_features=in_features)


def lowrank_correction(x, a, b, g):
    return call("LowRankCorrection", x, a, b, g)
