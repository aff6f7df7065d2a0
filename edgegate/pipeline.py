"""The export pipeline: model file -> bundle directory, one named, timed step after another.

load -> find_gates -> export_onnx -> target.check -> target.compile -> golden I/O -> write_bundle.
Each step is a plain function of the previous step's value; ``run_export`` chains them, records
each step's wall time in the manifest and, with ``keep_intermediate``, keeps each step's output in
``<out>.steps/`` so a run can be inspected. Quantization and gate-aware calibration slot in between
``find_gates`` and ``export_onnx``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgegate.errors import EdgegateError, ExportError

log = logging.getLogger(__name__)

GOLDEN_SAMPLES = 64


@dataclass(frozen=True)
class ExportConfig:
    target: str = "cpu"
    quant: str = "fp32"  # fp32 | fp16 (a target build flag) | int8 | ternary
    calib: str | None = None  # built-in dataset name or .npz; default: the dataset the checkpoint names
    observer: str = "percentile"
    gate_precision: str | None = None
    calibration: str = "gate_aware"
    lowrank: int = 0
    min_coverage: int = 32
    batch: int | None = None
    exit_form: str = "auto"
    trust_model: bool = False
    model_class: str | None = None
    overwrite: bool = False
    keep_intermediate: bool = False
    target_options: Mapping[str, str] = field(default_factory=dict)  # --target-option KEY=VALUE


@dataclass
class StepTimer:
    """Wall time per named step, in order; ``on_step`` lets the CLI show progress."""

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
            self.seconds[name] = round(time.perf_counter() - t0, 4)


def input_spec(spec: dict) -> dict:
    """The model's single input (name, per-sample shape, dtype) from its checkpoint metadata."""
    meta = spec.get("meta") or {}
    inputs = meta.get("inputs")
    if not inputs:
        raise ExportError(
            "the checkpoint does not record its input (meta.inputs); save it with edgegate.save(model, path, "
            "meta={'inputs': [{'name': ..., 'shape': [...], 'dtype': ...}]})"
        )
    if len(inputs) != 1:
        raise ExportError(f"models with {len(inputs)} inputs are not supported yet; edgegate exports one input")
    return inputs[0]


def sample_inputs(spec: dict, n: int, seed: int = 0) -> np.ndarray:
    """``n`` real samples from the model's dataset when it names one, else seeded random ones."""
    meta = spec.get("meta") or {}
    inp = input_spec(spec)
    dataset = meta.get("dataset")
    if dataset:
        from edgegate.data import load_data

        x = load_data(dataset, [inp["name"]], {inp["name"]: inp["shape"]}).test_inputs()[:n]
        return np.ascontiguousarray(x.astype(inp["dtype"]))
    rng = np.random.default_rng(seed)
    shape = (n, *inp["shape"])
    if np.dtype(inp["dtype"]).kind in "iu":
        return rng.integers(0, int(meta.get("vocab_size", 2)), size=shape).astype(inp["dtype"])
    return rng.standard_normal(shape).astype(inp["dtype"])


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    import edgegate

    return {"edgegate": edgegate.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def run_export(model_path: str | Path, out: str | Path, config: ExportConfig,
               on_step: Callable[[str], None] | None = None) -> Path:
    """Export ``model_path`` for ``config.target`` into the bundle directory ``out``; returns its path."""
    import torch

    from edgegate import targets
    from edgegate.bundle import check_destination, write_bundle
    from edgegate.data import TensorSpec, load_data
    from edgegate.gates import find_gates
    from edgegate.loading import load
    from edgegate.onnx_export.torch_export import ExitForm, ExportOptions, export_onnx, output_names
    from edgegate.quantization.plan import Flavor
    from edgegate.quantization.step import QuantOptions, quantize_for_export, split_data

    out = Path(out)
    check_destination(out, config.overwrite)  # before minutes of calibration, not after
    target = targets.get(config.target)
    ok, why = target.is_available()
    if not ok:
        raise EdgegateError(f"target {config.target} is not available here: {why}")
    qopts = QuantOptions(scheme=config.quant, observer=config.observer, gate_precision=config.gate_precision,
                         calibration=config.calibration, lowrank=config.lowrank, min_coverage=config.min_coverage)

    timer = StepTimer(on_step=on_step)
    with timer.step("load"):
        loaded = load(model_path, trust_model=config.trust_model, model_class=config.model_class)
        model = loaded.module.eval()
        inp = input_spec(loaded.spec)
        spec = TensorSpec(inp["name"], tuple(inp["shape"]), inp["dtype"])
    with timer.step("find_gates"):
        gate_map = find_gates(model)
    calib, held_out = None, None
    source = config.calib or (loaded.spec.get("meta") or {}).get("dataset")
    quantized = config.quant in ("int8", "ternary")
    # Targets that balance or calibrate on data themselves (snn) get the calibration split even for float.
    if source and (quantized or getattr(target, "needs_calibration", False)):
        with timer.step("load_data"):
            calib, held_out = split_data(load_data(source, [spec.name], {spec.name: spec.shape}))
    with timer.step("calibrate" if quantized else "quantize"):
        q = quantize_for_export(model, gate_map, qopts, Flavor(getattr(target, "flavor", "cpu")), calib, held_out,
                                spec)
    options = ExportOptions(batch=config.batch, exit_form=ExitForm(config.exit_form))
    with timer.step("export_onnx"):
        x = sample_inputs(loaded.spec, GOLDEN_SAMPLES)
        proto = export_onnx(q.export_model, torch.from_numpy(x), inp["name"], options)
        _keep(config, out, "export_onnx.onnx", proto.SerializeToString())
        proto = q.lower(proto)
        _keep(config, out, "lowered.onnx", proto.SerializeToString())
    with timer.step("check"):
        problems = target.check(proto)
        if problems:
            raise ExportError(targets.refusal(target.name, problems))
    names = output_names(model)
    context = targets.CompileContext(
        quant=config.quant, batch=config.batch, input_name=inp["name"], output_names=tuple(names),
        calibration=calib.inputs[spec.name] if calib is not None else x, dataset=source)
    topts = targets.options_for_export(target, config.target_options, context)
    with timer.step("compile"), tempfile.TemporaryDirectory(prefix="edgegate-compile-") as workdir:
        artifact = target.compile(proto, topts, Path(workdir))
    with timer.step("golden"):
        runs_here, _ = targets.can_run(target)
        with target.load(artifact) if runs_here else contextlib.nullcontext() as runner:
            golden, x, got, want = _golden(artifact.files["model.onnx"], q.reference, x, inp["name"], names,
                                           config.batch, runner, reference_only=target.name != "cpu")
            also = None
            if any(r.get("kept") == "float" for r in artifact.options.get("latency_aware_decisions", {})
                   .get("regions", [])):  # regions run in float: the float model is a reference there too
                also = _golden(artifact.files["model.onnx"], q.export_model, x, inp["name"], names, config.batch,
                               runner, reference_only=target.name != "cpu")[3]
        golden_record = _check_golden(got, want, names, q.exact and artifact.options.get("exact", True), also)
        if "golden_atol" in artifact.options:  # the target knows its device's numerics (fp16, spikes)
            golden_record["atol"] = max(golden_record["atol"], float(artifact.options["golden_atol"]))
        golden_record["source"] = target.name if runs_here else "onnxruntime"
    manifest = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "source": {"file": Path(model_path).name, "sha256": loaded.sha256, "format": str(loaded.format)},
        "model": {"class": loaded.spec.get("class"), "config": loaded.spec.get("config"),
                  "meta": loaded.spec.get("meta")},
        "target": target.name,
        "target_options": artifact.options,
        "quant": {**q.record, "calibration_data": source if quantized else None},
        "gates": gate_map.to_dict(),
        "export": {"opset": proto.opset_import[0].version, "batch": config.batch,
                   "exit_form": _exit_form(q.export_model, options), "input": inp,
                   "outputs": names, "functions": [f.name for f in proto.functions]},
        "golden": {"samples": int(x.shape[0]), **golden_record},
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


EXACT_ATOL = 1e-4
MIN_TOP1_AGREEMENT = 0.9


def _check_golden(got: list[np.ndarray], want: list[np.ndarray], names: list[str], exact: bool,
                  also: list[np.ndarray] | None = None) -> dict:
    """Float graphs must match torch to float tolerance; integer graphs must follow their fake-quant model.

    ``atol`` is what ``edgegate bench`` allows on the device against the outputs stored here: the
    same runtime on another CPU may pick other integer kernels, so quantized bundles get a tolerance
    of 2% of the output range rather than float round-off. ``also``: outputs of the float model, for a
    graph the target runs partly in float (a top-1 the float model picks is then as good as the reference's).
    """
    from edgegate.quantization.step import agreement

    stats = agreement(got, want, names)
    if exact:
        err = max((v for k, v in stats.items() if k.endswith("_max_abs_err")), default=0.0)
        if err > EXACT_ATOL or any(v < 1.0 for k, v in stats.items() if k.endswith("_agreement")
                                   and not k.endswith("top1_agreement")):
            raise ExportError(f"the exported model disagrees with torch by {err:.3g} (> {EXACT_ATOL}) on golden "
                              "inputs; please report this model")
        return {"vs_torch": stats, "atol": EXACT_ATOL}
    scale = max((v for k, v in stats.items() if k.endswith("_scale")), default=1.0)
    # A near-tie is no evidence of a broken graph: a top-1 that the reference scores within the golden
    # tolerance of its own top-1 counts as agreeing, and so does the float model's top-1 (``also``).
    low = {}
    for k, v in stats.items():
        if k.endswith("top1_agreement") and v < MIN_TOP1_AGREEMENT:
            i = names.index(k[:-len("_top1_agreement")])
            if _top1_accepted(got[i], want[i], None if also is None else also[i], 0.02 * scale) < MIN_TOP1_AGREEMENT:
                low[k] = v
    if low:
        raise ExportError(f"the quantized ONNX model follows its fake-quant torch model on only {low} of golden "
                          "inputs; please report this model")
    return {"vs_torch": stats, "atol": max(EXACT_ATOL, 0.02 * scale)}


def _top1_accepted(got: np.ndarray, want: np.ndarray, also: np.ndarray | None, tol: float) -> float:
    """Fraction of rows whose top-1 in ``got`` the reference ``want`` scores within ``tol`` of its maximum,
    or that is the top-1 of ``also``."""
    g, w = got.reshape(-1, got.shape[-1]).argmax(-1), want.reshape(-1, want.shape[-1]).astype(np.float64)
    ok = w.max(-1) - np.take_along_axis(w, g[:, None], axis=1)[:, 0] <= tol
    if also is not None:
        ok |= g == also.reshape(-1, also.shape[-1]).argmax(-1)
    return float(np.mean(ok))


def _golden(onnx_bytes: bytes, model, x: np.ndarray, input_name: str, names: list[str], batch: int | None,
            runner=None, reference_only: bool = False):
    """Run the compiled model here and torch: (npz bytes, inputs, device outputs, torch outputs).

    The device outputs come from the target's own ``runner`` when it runs on this machine, else from
    ONNX Runtime on the bundle's ``model.onnx`` (the reference runtime). ``reference_only``: the graph
    is another target's (trt), so ORT runs it with basic optimizations only: its CPU fusions would
    quantize activations on the fly (DQ(int8 weight) -> MatMul), which the target does not do.
    """
    import io

    import onnxruntime as ort
    import torch

    if runner is None:
        so = ort.SessionOptions()
        if reference_only:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        session = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])

        def run(chunk: np.ndarray) -> list[np.ndarray]:
            return session.run(names, {input_name: chunk})
    else:
        def run(chunk: np.ndarray) -> list[np.ndarray]:
            out = runner.run({input_name: chunk})
            return [out[k] for k in names]
    step = batch or x.shape[0]
    if x.shape[0] % step:  # whole static batches only: tile or trim the samples
        x = np.resize(x, (step * max(1, x.shape[0] // step), *x.shape[1:]))
    outs: list[list[np.ndarray]] = [[] for _ in names]
    refs: list[list[np.ndarray]] = [[] for _ in names]
    with torch.no_grad():
        for i in range(0, x.shape[0], step):
            chunk = x[i:i + step]
            for acc, y in zip(outs, run(chunk), strict=True):
                acc.append(y)
            ref = model(torch.from_numpy(chunk))
            ref = ref if isinstance(ref, tuple) else (ref,)
            for acc, y in zip(refs, ref, strict=True):
                acc.append(y.numpy())
    got = [np.concatenate(a) for a in outs]
    want = [np.concatenate(a) for a in refs]
    buf = io.BytesIO()
    np.savez(buf, **{f"input.{input_name}": x}, **{f"output.{k}": v for k, v in zip(names, got, strict=True)})
    return buf.getvalue(), x, got, want


def _exit_form(model, options) -> str | None:
    """The early-exit form the export used (``auto`` resolved), None for a model without exits."""
    from edgegate.onnx_export.torch_export import resolve_exit_form

    form = resolve_exit_form(model, options)
    return None if form is None else str(form)


def _keep(config: ExportConfig, out: Path, name: str, data: bytes) -> None:
    if not config.keep_intermediate:
        return
    steps = out.with_name(out.name + ".steps")
    steps.mkdir(parents=True, exist_ok=True)
    (steps / name).write_bytes(data)
