"""Export stage: torch ``nn.Module`` -> ``onnx.ModelProto`` with the ``edgegate`` gating ops kept by name.

Input: a model in eval mode and an example input. Output: an ONNX model (opset 20) in which each
gating op is one node of domain ``edgegate`` and carries its model-local function, checked with
``onnx.checker`` (full check). Early-exit models become real control flow: nested ``If`` for batch
1, the compacting forward (exited samples dropped before the next stage) for batch > 1.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from enum import StrEnum

import onnx
import torch

from edgegate.errors import ExportError
from edgegate.onnx_export.early_exit import CondEarlyExit
from edgegate.onnx_export.passes import attach_functions, strip_debug_metadata
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


def is_early_exit(model: torch.nn.Module) -> bool:
    from edgegate.nn import EarlyExitNet

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
    example: torch.Tensor,
    input_name: str = "input",
    options: ExportOptions | None = None,
) -> onnx.ModelProto:
    """Export ``model`` (eval mode) traced on ``example`` (its batch size is replaced per ``options``)."""
    options = options or ExportOptions()
    model = model.eval()
    form = resolve_exit_form(model, options)
    module = CondEarlyExit(model) if form is ExitForm.IF else model
    batch = options.batch
    # A dynamic batch must be traced on a batch > 1 (torch.export specializes sizes 0 and 1).
    trace_batch = batch if batch is not None else max(2, example.shape[0])
    example = _resize_batch(example, trace_batch)
    dynamic = None if batch is not None else ({0: torch.export.Dim("batch", min=1, max=65536)},)

    register_onnx_schemas()
    # The exporter logs a warning per missing optional torchvision op; not ours to report.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)  # "ambiguous empty attribute" notes from the exporter
    sink = io.StringIO()
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, (example,), dynamo=True, external_data=False, opset_version=OPSET,
                input_names=[input_name], output_names=output_names(model), dynamic_shapes=dynamic,
                custom_translation_table=onnx_translation_table(), verbose=False, report=False,
            )
    except Exception as e:  # the exporter raises many types; keep the first line, chain the cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {first}") from e
    proto = strip_debug_metadata(attach_functions(program.model_proto))
    proto.producer_name = "edgegate"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"exported ONNX fails onnx.checker: {str(e).splitlines()[0]}") from e
    log.debug("exported %s: %d nodes, %d functions", type(model).__name__, len(proto.graph.node),
              len(proto.functions))
    return proto


def _resize_batch(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[0] >= n:
        return x[:n].contiguous()
    reps = (n + x.shape[0] - 1) // x.shape[0]
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n].contiguous()
