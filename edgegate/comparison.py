"""Stage 8, compare: a float model and its bundles -> a `CompareReport` (DESIGN.md §9).

Input: the model file (or Hugging Face folder) the bundles were exported from, one or more bundle
directories, evaluation data (a built-in dataset, whose held-out ``test`` split is used, or an ``.npz``
with one array per model input, keyed by input name, and optional ``labels``) and a `CompareConfig`.
Every bundle must come from that model (manifest source sha256). The model's inputs are the ones the
bundles were exported with (``export.inputs``; ``--input`` overrides), and every one is fed to each side.
Output: one `Row` per model variant: the float model (torch), each bundle (run by its own target's
runner) and, with ``baseline="naive"``, a naive-calibration bundle exported on the fly with
the same settings. Per row: accuracy / loss, top-1 agreement and output SQNR vs float, gate fidelity
measured on the bundle's outputs (exit index, route indices) plus the fidelity recorded at export
(mask Hamming of channel/threshold gates lives there only: masks are not graph outputs), per-layer
SQNR, latency (bench of the bundle; torch eager at batch 1 for float) and, for early-exit models, an
exit-threshold sweep. Every agreement and accuracy, measured here or recorded at export, comes with the
rows it was counted over and its Wilson 95% interval (``intervals``): on a few hundred rows one row is a
third of a percent, so a difference the interval does not clear is not one. `CompareReport.to_dict` is
the versioned JSON (``"format": "edgegate.compare"``, README, "Report formats"); ``reports.compare_text``
and ``reports.html`` render it.

How the two measured-by-probing quantities are defined (also written into the report's notes):
- per-layer SQNR: the float torch module's output vs the same layer's output in the bundle's
  ``model.onnx`` run by ONNX Runtime (CPU) with that tensor added as a graph output, with every exit
  disabled and MoE experts run densely (so both sides compute every row), then scored on the rows that
  reach the layer under the float model's deployed gating: samples that did not exit before its stage,
  tokens routed to its expert (the rows a gate-aware calibration is judged on);
- threshold sweep: one threshold for every exit, swept over `SWEEP`; float = torch with its thresholds
  set, bundle = its ``model.onnx`` on ONNX Runtime with the ``ExitDecision`` threshold initializers set.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from edgegate import targets
from edgegate.benchmark import BenchConfig, bench
from edgegate.bundle import read_bundle
from edgegate.data import (
    NEXT_TOKEN_TASK,
    Inputs,
    TensorSpec,
    load_data,
    next_token_labels,
    validate_inputs,
)
from edgegate.datasets import BUILTINS
from edgegate.errors import EdgegateError, TargetError
from edgegate.loading import load, model_inputs
from edgegate.onnx_export.torch_export import is_early_exit, output_names
from edgegate.pipeline import ExportConfig, run_export
from edgegate.reports.compare_record import CALIBRATION_ROWS_NOTE, DEVICE_NOTE, NOTES, CompareReport, Row
from edgegate.reports.layer_sqnr import add_layer_sqnr
from edgegate.reports.onnx_probe import ProbeError, exit_threshold_names, run_onnx, with_thresholds
from edgegate.reports.output_scores import (
    agreement,
    gate_outputs,
    histograms,
    logits_of,
    rate_intervals,
    sweep_point,
    task_metrics,
)
from edgegate.reports.skip_sweep import bundle_sweep, float_sweep, skipping
from edgegate.reports.stats import summarize_latencies

SWEEP = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.999)
EVAL_BATCH = 256
# How a bundle's latency is measured when not here: (bundle dir, config) -> its bench report (a device agent's).
Measure = Callable[[Path, Any], Any]


class CompareError(EdgegateError):
    """A bundle does not belong to the model, or compare cannot run with the given inputs."""


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    data: str
    split: str | None = None  # None: "test" when the data has splits (built-ins), else every row
    max_samples: int | None = None
    runs: int = 100  # timed runs per row
    warmup: int = 10
    baseline: str | None = None  # "naive": add a naive-calibration bundle per gate-aware int8 bundle
    layer_samples: int = 256  # rows used for per-layer SQNR
    trust_model: bool = False
    model_class: str | None = None
    inputs: tuple[TensorSpec, ...] = ()  # --input: the model's inputs (default: as the bundles record them)

    def __post_init__(self) -> None:
        if self.baseline not in (None, "naive"):
            raise CompareError(f"--baseline {self.baseline!r} is unknown; the only baseline is 'naive'")
        for name in ("runs", "layer_samples"):
            if getattr(self, name) < 1:
                raise CompareError(f"compare {name}={getattr(self, name)} must be >= 1")


def compare(model_path: str | Path, bundle_paths: Sequence[str | Path], config: CompareConfig,
            on_step: Callable[[str], None] | None = None, *, measure: Measure | None = None) -> CompareReport:
    """Evaluate the float model at `model_path` and every bundle on `config.data` (see module doc).

    `measure(bundle_dir, BenchConfig) -> BenchReport` times the given bundles elsewhere (``compare --device``:
    a device agent's client); accuracy and fidelity are still measured here. A `TargetError` from it (the
    device cannot run the target) makes that row skipped.
    """
    step = on_step or (lambda s: None)
    if not bundle_paths:
        raise CompareError("compare needs at least one bundle directory after the model")
    bundles = [read_bundle(p) for p in bundle_paths]
    given = config.inputs or _bundle_inputs(bundles)
    loaded = load(model_path, trust_model=config.trust_model, model_class=config.model_class, inputs=given)
    model = loaded.module.eval()
    specs = model_inputs(loaded.spec, given)
    for b in bundles:
        src = b.manifest.get("source") or {}
        if src.get("sha256") != loaded.sha256:
            raise CompareError(
                f"bundle {b.path} was exported from {src.get('file')} (sha256 {str(src.get('sha256'))[:12]}), "
                f"not from {model_path} (sha256 {loaded.sha256[:12]}); pass the model it was exported from")
    x, labels, data_info = _eval_data(config, specs)
    names = output_names(model)
    step("float model")
    with torch.no_grad():
        float_out = _torch_outputs(model, x, names)
    tokens = next_token_labels(x.arrays, labels, logits_of(float_out).shape)
    labels = labels if tokens is None else tokens  # a causal LM is scored per token on the next one
    float_row = _float_row(model, x, labels, float_out, config)
    skip = next((b.manifest["moe_skip"] for b in bundles if b.manifest.get("moe_skip")), None)
    if skip:
        step("float skip sweep")
        float_row = dataclasses.replace(float_row, skip_sweep=float_sweep(model, x, labels, skip))
    rows = [float_row]
    probes: list[tuple[int, Any]] = []
    jobs = [(b, "bundle") for b in bundles]
    late: list[Row] = []  # rows that say why something was not done, shown after the others
    with tempfile.TemporaryDirectory(prefix="edgegate-compare-") as tmp:
        if config.baseline == "naive":
            for i, b in enumerate(bundles):
                q = b.manifest.get("quant") or {}
                if q.get("scheme") == "int8" and (q.get("config") or {}).get("calibration") != "naive":
                    step(f"naive baseline for {b.path.name}")
                    (Path(tmp) / str(i)).mkdir()
                    jobs.append((read_bundle(_export_naive(model_path, b, Path(tmp) / str(i), config)), "baseline"))
            if len(jobs) == len(bundles):
                late.append(Row("naive baseline", "baseline", None, None, None, "naive", "skipped",
                                note="skipped: the naive baseline is the twin of a gate-aware int8 bundle; none given"))
        for b, kind in jobs:
            step(f"bundle {b.path.name}")
            reference = _skipping_reference(model, x, names, b.manifest, float_out)
            row, proto = _bundle_row(b, kind, x, labels, reference, config, measure)
            rows.append(row)
            if proto is not None:
                probes.append((len(rows) - 1, proto))
        if probes:
            step("per-layer SQNR")
            rows = add_layer_sqnr(rows, probes, model, x[: config.layer_samples], float_out)
    # A baseline bundle lived in a temp dir: it has a name, not a path.
    rows = [dataclasses.replace(r, name=f"{r.name} (naive)", path=None) if r.kind == "baseline" else r
            for r in rows] + late
    model_info = {"file": str(model_path), "sha256": loaded.sha256, "class": loaded.spec.get("class"),
                  "outputs": names}
    on_calib = [r.name for r in rows if r.recorded.get("measured_on") == "calibration"]
    notes = NOTES + ((f"{CALIBRATION_ROWS_NOTE}: {', '.join(on_calib)}",) if on_calib else ())
    notes += (DEVICE_NOTE,) if any(r.device for r in rows) else ()
    notes += (f"accuracy and loss: {NEXT_TOKEN_TASK}",) if tokens is not None else ()
    return CompareReport(model=model_info, data=data_info, rows=tuple(rows), notes=notes)


# ------------------------------------------------------------------------------------------------ data


def _bundle_inputs(bundles: Sequence[Any]) -> tuple[TensorSpec, ...]:
    """The inputs the bundles were exported with (``export.inputs``, or the older ``export.input``)."""
    found = []
    for b in bundles:
        ex = b.manifest.get("export") or {}
        rec = ex.get("inputs") or ([ex["input"]] if ex.get("input") else [])
        found.append(tuple(TensorSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in rec))
    other = next((b for b, f in zip(bundles, found, strict=True) if f != found[0]), None)
    if other is not None:
        raise CompareError(f"bundles {bundles[0].path} and {other.path} were exported with different inputs; "
                           "compare them separately")
    return found[0] if found else ()


def _eval_data(config: CompareConfig, specs: Sequence[TensorSpec]) -> tuple[Inputs, np.ndarray | None, dict]:
    data = load_data(config.data, [s.name for s in specs], {s.name: s.shape for s in specs})
    split = config.split or ("test" if "test" in data.splits and config.data in BUILTINS else "all")
    part = data.split(split)
    x = part.model_inputs([s.name for s in specs])
    if config.data in BUILTINS:  # built-ins come as float32/int64 samples; npz files must match exactly
        x = Inputs({s.name: x.arrays[s.name].astype(s.dtype) for s in specs})
    x = x[: config.max_samples] if config.max_samples else x
    validate_inputs(x.arrays, list(specs), source=f"data {config.data}")
    labels = None if part.labels is None else np.asarray(part.labels)[: len(x)]
    info = {"name": config.data, "split": split, "samples": len(x), "labels": labels is not None}
    return x.map(np.ascontiguousarray), labels, info


def _torch_outputs(model: Any, x: Inputs, names: Sequence[str]) -> dict[str, np.ndarray]:
    chunks: list[tuple] = []
    for i in range(0, len(x), EVAL_BATCH):
        out = x[i:i + EVAL_BATCH].map(torch.from_numpy).run(model)
        chunks.append(out if isinstance(out, tuple) else (out,))
    if len(chunks[0]) != len(names):
        raise CompareError(f"the model returns {len(chunks[0])} outputs but its export names {len(names)}")
    return {n: np.concatenate([c[j].numpy() for c in chunks]) for j, n in enumerate(names)}


# ----------------------------------------------------------------------------------------------- float


def _float_row(model: Any, x: Inputs, labels: np.ndarray | None, out: dict[str, np.ndarray],
               config: CompareConfig) -> Row:
    metrics = {**task_metrics(logits_of(out), labels), **gate_outputs(out)}
    hists = histograms(out)
    if "exit_index" in out:
        metrics["mean_exit_depth"] = float(out["exit_index"].mean() + 1)
    times = []
    with torch.no_grad():
        for i in range(config.warmup + config.runs):
            xi = x[i % len(x): i % len(x) + 1].map(torch.from_numpy)
            t0 = time.perf_counter_ns()
            xi.run(model)
            if i >= config.warmup:
                times.append((time.perf_counter_ns() - t0) / 1e6)
    sweep: tuple[dict[str, float], ...] = ()
    if _is_early_exit(model):
        points = []
        for t in SWEEP:
            m = copy.deepcopy(model)
            m.set_thresholds([t] * len(m.thresholds))
            with torch.no_grad():
                o = _torch_outputs(m, x, ["logits", "exit_index"])
            points.append({"threshold": t, **sweep_point(o["logits"], o["exit_index"], labels)})
        sweep = tuple(points)
    return Row("float", "float", None, "torch", "fp32", None, "ok", metrics=metrics,
               latency=summarize_latencies(times), batch=1, sweep=sweep, histograms=hists,
               latencies_ms=tuple(times))


def _is_early_exit(model: Any) -> bool:
    return is_early_exit(model)


# --------------------------------------------------------------------------------------------- bundles


def _bundle_row(bundle: Any, kind: str, x: Inputs, labels: np.ndarray | None,
                float_out: dict[str, np.ndarray], config: CompareConfig, measure: Measure | None) -> tuple[Row, Any]:
    """Evaluate one bundle on its target; (row, model.onnx proto for the layer probe or None)."""
    m = bundle.manifest
    q = m.get("quant") or {}
    fidelity = q.get("fidelity") or {}
    recorded = {k: fidelity[k] for k in ("top1_agreement", "output_sqnr_db", "samples", "measured_on",
                                         "trained_rows", "intervals") if k in fidelity}
    recorded.update(fidelity.get("summary") or {})
    head = dict(name=bundle.path.name, kind=kind, path=str(bundle.path), target=bundle.target,
                quant=q.get("scheme"), calibration=(q.get("config") or {}).get("calibration"), recorded=recorded)
    try:
        target = targets.get(bundle.target)
    except EdgegateError as e:
        return Row(**head, status="skipped", note=f"skipped: {e}"), None
    ok, why = targets.can_run(target)
    timing = BenchConfig(runs=config.runs, warmup=config.warmup)
    if measure is None:
        if not ok:
            return Row(**head, status="skipped", note=f"skipped: target {bundle.target} cannot run here: {why}"), None
        report = bench(bundle.path, timing, keep_latencies=True)
    else:
        try:
            report = measure(bundle.path, timing)
        except TargetError as e:  # the device cannot run this target
            return Row(**head, status="skipped", note=f"skipped: {e}"), None
    if not ok:  # timed on the device; nothing here runs it to measure accuracy
        return Row(**head, status="ok", note=f"accuracy and fidelity not measured: target {bundle.target} cannot "
                   f"run here: {why}", latency=report.latency, batch=report.batch, device=report.device,
                   latencies_ms=report.latencies_ms), None
    static = (m.get("export") or {}).get("batch")
    with target.load(bundle) as runner:
        out = _run_runner(runner, x, static)
    metrics = {**task_metrics(logits_of(out), labels), **gate_outputs(out)}
    metrics.update(agreement(float_out, out))
    intervals = rate_intervals(metrics, float_out)
    sweep: tuple[dict[str, float], ...] = ()
    skip_sweep: tuple[dict[str, float], ...] = ()
    proto, note = None, ""
    if "model.onnx" in bundle.files:
        proto = onnx.load(str(bundle.file("model.onnx")))
        try:
            if m.get("moe_skip"):
                skip_sweep = bundle_sweep(proto, x, labels, static, m["moe_skip"])
            if exit_threshold_names(proto):
                points = []
                for t in SWEEP:
                    o = run_onnx(with_thresholds(proto, t), dict(x.arrays), static)
                    points.append({"threshold": t, **sweep_point(logits_of(o), o["exit_index"], labels)})
                sweep = tuple(points)
            proto = (proto, static)
        except ProbeError as e:  # e.g. a target-specific model.onnx that ONNX Runtime cannot run
            note, proto = f"no sweep or per-layer SQNR: {e}", None
    row = Row(**head, status="ok", note=note, metrics=metrics, latency=report.latency, batch=report.batch,
              sweep=sweep, skip_sweep=skip_sweep, histograms=histograms(out), device=report.device,
              intervals=intervals, latencies_ms=report.latencies_ms)
    return row, proto


def _skipping_reference(model: Any, x: Inputs, names: list[str], manifest: Mapping[str, Any],
                        float_out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a bundle's agreements are counted against: the float model's outputs, or for a bundle exported
    with ``--moe-skip`` the float model skipping as its manifest records (same alpha_l and tau), so a slot
    both skip agrees and the route sets compare like with like."""
    skip = manifest.get("moe_skip")
    if not skip:
        return float_out
    with skipping(model, skip), torch.no_grad():
        return _torch_outputs(model, x, names)


def _run_runner(runner: Any, x: Inputs, static: int | None) -> dict[str, np.ndarray]:
    step = static or EVAL_BATCH
    chunks: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(x), step):
        part = x[i:i + step]
        rows = len(part)
        if static and rows < static:  # a static batch takes whole batches: pad with the last row
            part = part[np.minimum(np.arange(static), rows - 1)]
        for k, v in runner.run(dict(part.arrays)).items():
            chunks.setdefault(k, []).append(np.asarray(v)[:rows])
    return {k: np.concatenate(v) for k, v in chunks.items()}


# -------------------------------------------------------------------------------------------- baseline


def _export_naive(model_path: str | Path, bundle: Any, tmp: Path, config: CompareConfig) -> Path:
    """Export the naive-calibration twin of `bundle` (its manifest's settings, calibration=naive)."""
    m = bundle.manifest
    qc = (m.get("quant") or {}).get("config") or {}
    ex = m.get("export") or {}
    cfg = ExportConfig(target=bundle.target, quant="int8", calib=(m.get("quant") or {}).get("calibration_data"),
                       holdout=(m.get("quant") or {}).get("holdout"),
                       observer=qc.get("observer", "percentile"), calibration="naive",
                       min_coverage=int(qc.get("min_coverage", 32)), batch=ex.get("batch"),
                       exit_form=ex.get("exit_form") or "auto", trust_model=config.trust_model,
                       model_class=config.model_class, inputs=_bundle_inputs([bundle]),
                       # the same expert skipping: tau as recorded (alpha_l re-calibrated on the same rows)
                       moe_skip=repr(float(m["moe_skip"]["tau"])) if m.get("moe_skip") else "off")
    return run_export(model_path, tmp / bundle.path.name, cfg)
