"""Export stage: torch ``nn.Module`` -> ``onnx.ModelProto`` with the ``edgegate`` gating ops kept by name.

Input: a model in eval mode and example inputs (one tensor, or several in forward's order, named).
Output: an ONNX model (opset 20) with one graph input per model input (a shared dynamic batch unless
``batch`` fixes it) in which each gating op is one node of domain ``edgegate`` and carries its
model-local function, checked with ``onnx.checker`` (full check). Early-exit models become real
control flow: nested ``If`` for batch 1, the compacting forward (exited samples dropped before the
next stage) for batch > 1. MoE blocks take ``options.moe_form`` (dense, or sparse: the FFN experts as one
``edgegate.moe::RoutedExperts`` node that ``passes.lower_moe`` lowers for the cpu target). An exporter
failure is one line (`exporter_error`): its innermost cause, without the exporter's own boilerplate;
``--debug`` shows the chained traceback.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import onnx
import torch
from onnxscript.values import Opset

from edgegate.data import Inputs
from edgegate.errors import ExportError
from edgegate.heap import release_freed_heap
from edgegate.nn.early_exit import EarlyExitNet
from edgegate.nn.moe import MoE
from edgegate.nn.routed_experts import MoEForm
from edgegate.onnx_export.check import check_proto
from edgegate.onnx_export.early_exit import CondEarlyExit
from edgegate.onnx_export.passes import attach_functions, lower_moe, strip_debug_metadata
from edgegate.ops.onnx_function import onnx_translation_table, register_onnx_schemas

log = logging.getLogger(__name__)

OPSET = 20


class ExitForm(StrEnum):
    AUTO = "auto"  # If for batch 1, compaction otherwise
    IF = "if"
    COMPACT = "compact"


@dataclass(frozen=True)
class ExportOptions:
    batch: int | None = None  # None: dynamic batch dimension
    exit_form: ExitForm = ExitForm.AUTO
    moe_form: MoEForm = MoEForm.DENSE  # sparse: only what the cpu lowering (passes.lower_moe) can run


def is_early_exit(model: torch.nn.Module) -> bool:
    return isinstance(model, EarlyExitNet)


def output_names(model: torch.nn.Module) -> list[str]:
    """Names of the eval forward's outputs: a model may declare them (``output_names``, e.g. a MoE
    classifier's ``("logits", "route_indices")``); early-exit nets give ``logits, exit_index``."""
    declared = getattr(model, "output_names", None)
    if declared:
        return [str(n) for n in declared]
    return ["logits", "exit_index"] if is_early_exit(model) else ["logits"]


def resolve_exit_form(model: torch.nn.Module, options: ExportOptions) -> ExitForm | None:
    if not is_early_exit(model):
        return None
    if options.exit_form is ExitForm.AUTO:
        return ExitForm.IF if options.batch == 1 else ExitForm.COMPACT
    if options.exit_form is ExitForm.IF and options.batch != 1:
        raise ExportError("early exit as ONNX If needs a static batch of 1: pass --batch 1 (or --exit-form compact)")
    return options.exit_form


def export_onnx(
    model: torch.nn.Module,
    example: torch.Tensor | tuple[torch.Tensor, ...] | Mapping[str, torch.Tensor] | Inputs,
    input_name: str | Sequence[str] = "input",
    options: ExportOptions | None = None,
) -> onnx.ModelProto:
    """Export ``model`` (eval mode) traced on ``example``: one tensor, a tuple in forward's order (named by
    ``input_name``, a name per tensor), or a dict / Inputs keyed by input name. Each input's batch size
    is replaced per ``options``; all inputs share one batch dimension."""
    options = options or ExportOptions()
    model = model.eval()
    names = [input_name] if isinstance(input_name, str) else list(input_name)
    inputs = Inputs.of(example, names)
    form = resolve_exit_form(model, options)
    if form is ExitForm.IF and len(inputs.arrays) != 1:
        raise ExportError("early exit as ONNX If takes one model input; export with --exit-form compact")
    module = CondEarlyExit(model) if form is ExitForm.IF else model
    batch = options.batch
    # A dynamic batch must be traced on a batch > 1 (torch.export specializes sizes 0 and 1).
    trace_batch = batch if batch is not None else max(2, len(inputs))
    inputs = inputs.map(lambda t: _resize_batch(t, trace_batch))
    dynamic = None if batch is not None else _dynamic_batch(module, len(inputs.arrays))

    register_onnx_schemas()
    lower_moe.register_schema()
    sink = io.StringIO()
    try:
        # The exporter prints FX graph dumps and step banners on failure: kept out of the user's terminal
        # (logged at debug level below), as are its notes about optional ops that are not ours to report.
        with torch.no_grad(), warnings.catch_warnings(), _quiet_loggers(), contextlib.redirect_stdout(sink), \
                contextlib.redirect_stderr(sink), moe_export_form(model, options.moe_form):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, inputs.args, dynamo=True, external_data=False, opset_version=OPSET,
                input_names=list(inputs.names), output_names=output_names(model), dynamic_shapes=dynamic,
                custom_translation_table={**onnx_translation_table(), **_moe_translation()}, verbose=False,
                report=False,
            )
    except Exception as e:  # the exporter raises many types; one line from the innermost cause
        log.debug("exporter output:\n%s", sink.getvalue())
        raise ExportError(exporter_error(type(model).__name__, e)) from e
    # One proto of the weights at a time: the exporter's is ours alone, so the passes change it in place.
    proto = program.model_proto
    del program
    proto = strip_debug_metadata(attach_functions(proto, inplace=True), inplace=True)
    proto.producer_name = "edgegate"
    try:
        check_proto(proto)  # through a file: one copy of the weights fewer than check_model of the proto
        release_freed_heap()  # the checker's parsed copies of the model
    except onnx.checker.ValidationError as e:
        raise ExportError(f"exported ONNX fails onnx.checker: {str(e).splitlines()[0]}") from e
    log.debug("exported %s: %d nodes, %d functions", type(model).__name__, len(proto.graph.node),
              len(proto.functions))
    return proto


@contextlib.contextmanager
def moe_export_form(model: torch.nn.Module, form: MoEForm) -> Iterator[None]:
    """Every MoE block of ``model`` exports in ``form`` for the duration (their own setting after)."""
    blocks = [m for m in model.modules() if isinstance(m, MoE)]
    before = [getattr(m, "export_form", MoEForm.DENSE) for m in blocks]
    for m in blocks:
        m.export_form = MoEForm(form)
    try:
        yield
    finally:
        for m, f in zip(blocks, before, strict=True):
            m.export_form = f


def _moe_translation() -> dict:
    """The exporter's translation of ``edgegate::routed_experts``: one ``RoutedExperts`` node over the expert
    parameters' initializers (inputs ``x, w, params...``; see ``passes.lower_moe``)."""
    opset = Opset(lower_moe.DOMAIN, lower_moe.VERSION)

    def routed_experts(x, weights, params, act: str = "silu", bias: bool = False, k: int = 1):
        return opset.RoutedExperts(x, weights, *params, act=act, bias=int(bias), k=int(k))

    return {torch.ops.edgegate.routed_experts.default: routed_experts}


# Loggers the exporter writes to while it works (notes, and errors it then raises as the exception we
# report), each silenced for the duration of an export unless debug logging is on.
_NOISY_LOGGERS = ("torch.onnx._internal.exporter._registration", "onnx_ir", "torch.fx.experimental.symbolic_shapes",
                  "torch._export", "torch.export", "torch._dynamo")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
MAX_ERROR = 300
# torch.export's guard errors when Python branches on a tensor's value (`if x.max() > t:`).
_DATA_DEPENDENT = ("GuardOnDataDependentSymNode", "Could not guard on data-dependent", "data-dependent expression",
                   "Could not extract specialized integer from data-dependent")
CONTROL_FLOW_HINT = ("its forward branches in Python on tensor values, which cannot be exported; for an "
                     "early-exit network wrap its stages and heads with edgegate.nn.EarlyExitNet.wrap(stages, heads, "
                     "thresholds, policy), otherwise express the branch with torch.cond")


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    if log.isEnabledFor(logging.DEBUG):  # --debug: let the exporter speak
        yield
        return
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def exporter_error(model_name: str, error: BaseException) -> str:
    """One line for an exporter failure: the innermost cause of ``error`` (the exporter wraps it in step
    banners and advice), without ANSI codes or graph dumps, at most `MAX_ERROR` characters. A Python branch
    on tensor values gets its own message saying what to do instead."""
    chain: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    if any(any(m in f"{type(c).__name__}: {c}" for m in _DATA_DEPENDENT) for c in chain):
        return f"cannot export {model_name}: {CONTROL_FLOW_HINT}"
    # The innermost explicit cause (``raise ... from``) says what went wrong; an implicit context below it
    # is what was being handled when it was raised (often the exporter's own follow-up error), used only
    # when the cause says nothing.
    cause = chain[0]
    while cause.__cause__ is not None and cause.__cause__ in chain:
        cause = cause.__cause__
    if not str(cause).strip() and cause is not chain[-1]:
        cause = chain[-1]
    return f"torch.onnx.export failed for {model_name}: {_first_line(cause)}"


def _first_line(e: BaseException) -> str:
    """The first line of ``e`` that says something, cleaned up and bounded."""
    text = _ANSI.sub("", str(e))
    text = text.split("Next steps:", 1)[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(("#", "File "))]
    line = lines[0] if lines else type(e).__name__
    if type(e).__name__ not in line:
        line = f"{type(e).__name__}: {line}"
    return line if len(line) <= MAX_ERROR else line[: MAX_ERROR - 3] + "..."


def _dynamic_batch(module: torch.nn.Module, n: int) -> tuple[Any, ...]:
    """torch.export's ``dynamic_shapes`` making dim 0 of each of the ``n`` inputs one shared batch dimension;
    inputs that a ``forward(*args)`` collects go in one tuple, as torch.export binds them."""
    dim = torch.export.Dim("batch", min=1, max=65536)
    params = list(inspect.signature(module.forward).parameters.values())
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(named) >= n or not any(p.kind is p.VAR_POSITIONAL for p in params):
        return tuple({0: dim} for _ in range(n))
    return (*({0: dim} for _ in named), tuple({0: dim} for _ in range(n - len(named))))


def _resize_batch(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[0] >= n:
        return x[:n].contiguous()
    reps = (n + x.shape[0] - 1) // x.shape[0]
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n].contiguous()
