"""The export pipeline: model file, folder or module -> bundle directory, one named, timed step after another.

load -> convert -> find_gates -> [load_data -> calibrate/quantize] -> export_onnx -> target.check ->
target.compile -> golden I/O -> write_bundle. Each step is a plain function of the previous step's value;
``run_export`` chains them, records each step's wall time in the manifest and, with
``keep_intermediate``, keeps each step's output in ``<out>.steps/`` so a run can be inspected.
``export`` is the same from Python with keyword options, and also takes an ``nn.Module`` with example
inputs. Every model input (``--input``, or what the model records) travels through every step: the
calibration data, the ONNX graph inputs, ``golden_io.npz`` and the manifest's ``export.inputs``. The torch
steps (load .. export_onnx) run in one call whose models die with it: check, compile and golden hold the graph
and the golden reference outputs (computed before export_onnx), not the models (export peak memory).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

from edgegate import __version__, targets
from edgegate.bundle_write import check_destination, write_bundle
from edgegate.convert import class_path, convert, converters, verify
from edgegate.data import Inputs, TensorSpec, load_data, row_counts, split_data
from edgegate.errors import DataError, EdgegateError, ExportError
from edgegate.gates import find_gates
from edgegate.golden import (
    EXACT_ATOL,
    MIN_TOP1_AGREEMENT,
    check_golden,
    golden_inputs,
    run_golden,
    sample_inputs,
    torch_outputs,
)
from edgegate.heap import release_freed_heap
from edgegate.loading.inputs import parse_input
from edgegate.loading.source import describe, open_source
from edgegate.nn.routed_experts import MoEForm
from edgegate.quantization.config import DEFAULT_FIDELITY_TARGET
from edgegate.quantization.plan import QdqForm
from edgegate.quantization.step import QuantOptions, quantize_for_export
from edgegate.schemes import QuantScheme

__all__ = ["EXACT_ATOL", "GOLDEN_SAMPLES", "MIN_TOP1_AGREEMENT", "ExportConfig", "StepTimer", "export",
           "run_export", "sample_inputs", "versions"]

log = logging.getLogger(__name__)

GOLDEN_SAMPLES = 64
VERIFY_ROWS = 512  # rows a conversion is checked on (the first calibration rows)


@dataclass(frozen=True)
class ExportConfig:
    target: str = "cpu"
    quant: str = "fp32"  # fp32 | fp16 (a target build flag) | int8 | ternary
    calib: str | None = None  # built-in dataset name or .npz; default: the dataset the checkpoint names
    holdout: float | None = None  # share of a --calib file's rows held out to measure fidelity
    observer: str = "percentile"
    gate_precision: str | None = None
    calibration: str = "gate_aware"
    lowrank: int = 0
    min_coverage: int = 32
    fidelity_target: float = DEFAULT_FIDELITY_TARGET  # int8 gate-aware: each gate's agreement with float; 0: off
    batch: int | None = None
    exit_form: str = "auto"
    trust_model: bool = False
    model_class: str | None = None
    inputs: tuple[TensorSpec, ...] = ()  # --input: the model's inputs, in forward's order
    overwrite: bool = False
    keep_intermediate: bool = False
    target_options: Mapping[str, str] = field(default_factory=dict)  # --target-option KEY=VALUE
    moe_skip: str = "off"  # --moe-skip auto | off | TAU (MoDES expert skipping)
    moe_skip_budget: float = 0.005  # --moe-skip-budget: accuracy points (or relative loss) the search may lose


@dataclass
class StepTimer:
    """Wall time per named step, in order (a step run twice adds up); ``on_step`` lets the CLI show progress."""

    seconds: dict[str, float] = field(default_factory=dict)
    on_step: Callable[[str], None] | None = None

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        if self.on_step:
            self.on_step(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 4)


def versions() -> dict[str, str]:
    return {"edgegate": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def export(model_or_path: Any, example_inputs: Any = None, *, target: str = "cpu", out: str | Path | None = None,
           on_step: Callable[[str], None] | None = None, **options: Any) -> Path:
    """Export a model file / Hugging Face folder, or an ``nn.Module``, into the bundle directory ``out``.

    ``example_inputs`` (a tensor, a tuple in forward's order, or a dict keyed by input name; batch
    first) name and shape the inputs of a module or of a file that records none, and are the golden
    samples. ``options`` are `ExportConfig` fields (``quant="int8"``, ``calib="data.npz"``,
    ``holdout=0.2``, ``inputs=["x:1x3x32x32"]``, ...). ``out`` defaults to ``MODEL.edgegate`` beside a
    model file. Returns the bundle's path.
    """
    known = {f.name for f in dataclasses.fields(ExportConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise EdgegateError(f"edgegate.export got unknown option {unknown[0]!r}; known: {', '.join(sorted(known))}")
    if "inputs" in options:
        options["inputs"] = tuple(parse_input(i) if isinstance(i, str) else i for i in options["inputs"])
    if out is None:
        if isinstance(model_or_path, torch.nn.Module):
            raise EdgegateError("edgegate.export(module, ...) needs out=DIR, the bundle directory to write")
        out = Path(model_or_path).with_suffix(".edgegate")
    return run_export(model_or_path, out, ExportConfig(target=target, **options), on_step,
                      example_inputs=example_inputs)


def run_export(model_path: Any, out: str | Path, config: ExportConfig,
               on_step: Callable[[str], None] | None = None, *, example_inputs: Any = None) -> Path:
    """Export ``model_path`` (a model file, a Hugging Face folder or an ``nn.Module``) for ``config.target``
    into the bundle directory ``out``; returns its path. ``example_inputs``: see `export`."""
    out = Path(out)
    check_destination(out, config.overwrite)  # before minutes of calibration, not after
    skipping = _skip_option(config)
    target = targets.get(config.target)
    ok, why = target.is_available()
    if not ok:
        raise EdgegateError(f"target {config.target} is not available here: {why}")
    timer = StepTimer(on_step=on_step)
    # The torch side returns the graph and what the later steps read of the models: the models (the float one,
    # the fake-quant one: each the size of the weights) are freed before the graph is checked and compiled.
    proto, t = _torch_steps(model_path, out, config, target, skipping, timer, example_inputs)
    release_freed_heap()
    with timer.step("check"):
        problems = target.check(proto)
        if problems:
            raise ExportError(targets.refusal(target.name, problems))
    names_in = [s.name for s in t.specs]
    rows = t.calib.model_inputs(names_in) if t.calib is not None else t.x
    context = targets.CompileContext(
        quant=config.quant, batch=config.batch, input_name=names_in[0], output_names=tuple(t.names),
        calibration=rows.first, dataset=t.source_data, calibration_inputs=dict(rows.arrays),
        inputs=tuple(targets.TensorSpec(s.name, (config.batch, *s.shape), np.dtype(s.dtype)) for s in t.specs))
    topts = targets.options_for_export(target, config.target_options, context)
    with timer.step("compile"), tempfile.TemporaryDirectory(prefix="edgegate-compile-") as workdir:
        artifact = target.compile(proto, topts, Path(workdir))
    # The artifact holds the weights now: the proto's copy goes before the golden run (export peak memory).
    opset, functions = proto.opset_import[0].version, [f.name for f in proto.functions]
    del proto
    release_freed_heap()
    with timer.step("golden"):
        runs_here, _ = targets.can_run(target)
        with target.load(artifact) if runs_here else contextlib.nullcontext() as runner:
            golden, x, got, want = run_golden(artifact.files["model.onnx"], t.want, t.x, t.names, config.batch,
                                              runner, reference_only=target.golden_on_reference)
        also = None
        if any(r.get("kept") == "float" for r in artifact.options.get("latency_aware_decisions", {})
               .get("regions", [])):  # regions run in float: the float model is a reference there too
            also = t.float_want
        golden_record = check_golden(got, want, t.names, t.exact and artifact.options.get("exact", True), also)
        if "golden_atol" in artifact.options:  # the target knows its device's numerics (fp16, spikes)
            golden_record["atol"] = max(golden_record["atol"], float(artifact.options["golden_atol"]))
        golden_record["source"] = target.name if runs_here else "onnxruntime"
    quant_record = {**t.quant, "calibration_data": t.source_data if t.quantized else None}
    if t.quantized:
        quant_record["holdout"] = config.holdout
        # Which rows calibrated (and judged the fidelity search) and which were held out, by split of origin.
        quant_record["data_split"] = {"calibration": row_counts(t.calib), "held_out": row_counts(t.held_out)}
    manifest = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "source": t.source,
        "model": {"class": t.spec.get("class"), "config": t.spec.get("config"), "meta": t.spec.get("meta")},
        "target": target.name,
        "target_options": artifact.options,
        "quant": quant_record,
        "conversion": t.conversion,
        "gates": t.gates,
        "moe_skip": t.moe_skip,
        "export": {"opset": opset, "batch": config.batch, "exit_form": t.exit_form, "input": t.specs[0].to_dict(),
                   "inputs": [s.to_dict() for s in t.specs], "outputs": t.names, "functions": functions},
        "golden": {"samples": len(x), **golden_record},
        "timings_s": timer.seconds,
    }
    files = dict(artifact.files)
    files["golden_io.npz"] = golden
    if on_step:
        on_step("write_bundle")  # the caller's last chance to stop before anything is written
    t0 = time.perf_counter()
    path = write_bundle(out, files, manifest, overwrite=config.overwrite)
    log.info("wrote %s in %.2fs (steps: %s)", path, time.perf_counter() - t0, json.dumps(timer.seconds))
    return path


@dataclass(frozen=True)
class _TorchSide:
    """What the steps after export_onnx read of the torch side: records, data, golden reference outputs; no model."""

    spec: dict  # the loaded model's spec (class, config, meta)
    source: dict  # the manifest's ``source`` entry
    specs: tuple[TensorSpec, ...]
    source_data: str | None
    quantized: bool
    calib: Any  # calibration rows (Dataset) or None, and the held-out rows
    held_out: Any
    x: Inputs  # golden samples
    names: list[str]  # output names
    want: list[np.ndarray]  # the reference's outputs on ``x`` (golden.torch_outputs)
    float_want: list[np.ndarray] | None  # the float (export) model's, where it is not the reference
    quant: dict[str, Any]  # the quantize step's record
    exact: bool
    conversion: dict[str, Any]  # the records of the conversion, the gates, expert skipping (manifest entries)
    gates: dict[str, Any]
    moe_skip: Any
    exit_form: str | None


def _torch_steps(model_path: Any, out: Path, config: ExportConfig, target: Any, skipping: Any, timer: StepTimer,
                 example_inputs: Any) -> tuple[onnx.ModelProto, _TorchSide]:
    """load -> convert -> find_gates -> [load_data -> calibrate/quantize] -> export_onnx: (the lowered graph,
    what the later steps need); the models die with this call."""
    # The exporter loads torch.onnx (dynamo, onnxscript) when an export gets there, not with the pipeline: an
    # export interrupted before it then exits 130 cleanly instead of dying with torch.onnx's machinery loaded.
    from edgegate.onnx_export.torch_export import ExitForm, ExportOptions, export_onnx, output_names

    qopts = QuantOptions(scheme=config.quant, observer=config.observer, gate_precision=config.gate_precision,
                         calibration=config.calibration, lowrank=config.lowrank, min_coverage=config.min_coverage,
                         fidelity_target=config.fidelity_target)
    with timer.step("load"):
        source = open_source(model_path, trust_model=config.trust_model, model_class=config.model_class,
                             inputs=config.inputs, example_inputs=example_inputs)
        loaded, specs = source.loaded, source.inputs
        model = loaded.module.eval()
    release_freed_heap()  # the checkpoint's tensors, copied into the model (225 MB on a 59M-parameter LM)
    with timer.step("convert"):
        original, model, conversion = _convert(model, convert)
    with timer.step("find_gates"):
        gate_map = find_gates(model)
    source_data = config.calib or (loaded.spec.get("meta") or {}).get("dataset")
    quantized = QuantScheme.parse(config.quant).calibrated
    if skipping is not None and not source_data:
        raise ExportError("--moe-skip calibrates on data: pass --calib NAME|FILE.npz (the model names no dataset)")
    # Targets that balance or calibrate on data themselves (snn) get the calibration split even for float.
    calib, held_out = None, None
    if source_data and (quantized or skipping is not None or target.needs_calibration):
        with timer.step("load_data"):
            calib, held_out = _load_calibration(source_data, specs, config.holdout)
    elif config.holdout is not None:
        raise ExportError("--holdout sets aside rows of the calibration data: it needs --quant int8|ternary and "
                          "--calib FILE.npz")
    with timer.step("convert"):  # the golden samples go through the model first; the conversion is checked on data
        x = golden_inputs(source.examples, loaded.spec, specs, held_out or calib, GOLDEN_SAMPLES)
        _check_fits(model, x, specs)
        conversion = _verify(original, conversion, calib, x)
    skip_record = None
    if skipping is not None:
        # the calibration stage (brevitas): loaded only by an export that skips experts
        from edgegate.calibration.expert_skip import skip_for_export

        with timer.step("moe_skip"):  # the routers skip from here on: calibration and export see it
            skip_record = skip_for_export(model, gate_map, skipping, calib, held_out, [s.name for s in specs])
            gate_map = find_gates(model)
    with timer.step("calibrate" if quantized else "quantize"):
        q = quantize_for_export(model, gate_map, qopts, QdqForm(target.qdq_form), calib, held_out, specs)
    options = ExportOptions(batch=config.batch, exit_form=ExitForm(config.exit_form), moe_form=MoEForm(target.moe_form))
    with timer.step("export_onnx"):
        # The torch half of the golden check first, so the fake-quant reference is freed before the exporter runs.
        want = torch_outputs(q.reference, x, config.batch)
        float_want = None if q.reference is q.export_model else torch_outputs(q.export_model, x, config.batch)
        t = _TorchSide(spec=loaded.spec, source=describe(loaded), specs=tuple(specs), source_data=source_data,
                       quantized=quantized, calib=calib, held_out=held_out, x=x, names=output_names(model),
                       want=want, float_want=float_want, quant=q.record, exact=q.exact,
                       conversion=conversion.to_dict(), gates=gate_map.to_dict(), moe_skip=skip_record,
                       exit_form=_exit_form(q.export_model, options))
        export_model, lower = q.export_model, q.lower
        del q, source, loaded, model, original, conversion, gate_map  # the exporter needs export_model alone
        release_freed_heap()
        proto = export_onnx(export_model, x.map(torch.from_numpy), [s.name for s in specs], options)
        del export_model
        release_freed_heap()
        _keep(config, out, "export_onnx.onnx", proto)
        proto = lower(proto)
        _keep(config, out, "lowered.onnx", proto)
    return proto, t


def _skip_option(config: ExportConfig) -> Any:
    """``--moe-skip`` parsed (None for off), before anything is loaded."""
    if str(config.moe_skip).strip().lower() == "off":
        return None
    # Imported here like the other stages run_export uses: the calibration package loads brevitas.
    from edgegate.calibration.expert_skip import SkipOption

    return SkipOption.parse(config.moe_skip, config.moe_skip_budget)


def _convert(model: Any, convert: Callable[[Any], Any]) -> tuple[Any, Any, Any]:
    """(original, model to export, Conversion): converters run on a copy, so the original (the user's own
    module, from Python) is left as it was and the conversion can be checked against it."""
    known = converters()
    if not any(class_path(type(m)) in known for m in model.modules()):
        conversion = convert(model)  # nothing to replace: the model itself, no copy
        return model, conversion.module, conversion
    original = model
    conversion = convert(copy.deepcopy(model))
    return original, conversion.module.eval(), conversion  # replacements are built in training mode


def _verify(original: Any, conversion: Any, calib: Any, golden: Inputs) -> Any:
    """The conversion checked on the first calibration rows (the golden samples without calibration data)."""
    if not conversion.converted:
        return conversion
    rows = calib.model_inputs() if calib is not None else golden
    try:
        return verify(original, conversion, dict(rows[:VERIFY_ROWS].arrays))
    except TypeError as e:  # verify calls both models with the inputs by name
        raise ExportError(f"checking the converted model calls it with its inputs by name ({', '.join(rows.names)}) "
                          f"and it refused them ({e}); name --input after forward's arguments") from e


def _check_fits(model: Any, x: Inputs, specs: Sequence[TensorSpec]) -> None:
    """The model runs on two samples of its inputs: a wrong --input becomes a DataError, not an exporter trace.
    (Like ``calibration.inputs.check_fits``, without importing the calibration stage, which loads brevitas.)"""
    try:
        with torch.no_grad():
            x[:2].map(torch.from_numpy).run(model)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        shown = ", ".join(f"{s.name}:{'x'.join(str(d) for d in ('N', *s.shape))}:{s.dtype}" for s in specs)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"model inputs {shown} (--input, or as the model records them) do not fit the model "
                        f"({first}); give each input's shape batch first, in forward's order") from e


def _load_calibration(source: str, specs: Sequence[TensorSpec], holdout: float | None) -> tuple[Any, Any]:
    """(calibration rows, held-out rows or None) of ``source`` for every model input; built-in samples are
    cast to the input dtypes (a user's file must already have them)."""
    data = load_data(source, [s.name for s in specs], {s.name: s.shape for s in specs})
    if data.is_builtin:
        data = dataclasses.replace(data, inputs={s.name: data.inputs[s.name].astype(s.dtype) for s in specs})
    return split_data(data, holdout)


def _exit_form(model, options) -> str | None:
    """The early-exit form the export used (``auto`` resolved), None for a model without exits."""
    from edgegate.onnx_export.torch_export import resolve_exit_form  # see run_export

    form = resolve_exit_form(model, options)
    return None if form is None else str(form)


def _keep(config: ExportConfig, out: Path, name: str, proto: onnx.ModelProto) -> None:
    if not config.keep_intermediate:
        return  # serialized only when kept: the bytes are one more copy of the weights
    steps = out.with_name(out.name + ".steps")
    steps.mkdir(parents=True, exist_ok=True)
    (steps / name).write_bytes(proto.SerializeToString())
