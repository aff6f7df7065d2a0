"""The export pipeline: model file -> bundle directory, one named, timed step after another.

load -> find_gates -> export_onnx -> target.check -> target.compile -> golden I/O -> write_bundle.
Each step is a plain function of the previous step's value; ``run_export`` chains them, records
each step's wall time in the manifest and, with ``keep_intermediate``, keeps each step's output in
``<out>.steps/`` so a run can be inspected. Quantization and gate-aware calibration slot in between
``find_gates`` and ``export_onnx``.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable, Iterator
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
    quant: str = "fp32"
    batch: int | None = None
    exit_form: str = "auto"
    trust_model: bool = False
    model_class: str | None = None
    overwrite: bool = False
    keep_intermediate: bool = False


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
    from edgegate.bundle import write_bundle
    from edgegate.export.torch_export import ExitForm, ExportOptions, export_onnx, output_names
    from edgegate.gates import find_gates
    from edgegate.loading import load

    if config.quant != "fp32":
        raise EdgegateError(f"--quant {config.quant} is not available yet; this version exports --quant fp32")
    out = Path(out)
    if out.exists() and not config.overwrite:
        raise EdgegateError(f"{out} already exists; pass --overwrite to replace it or choose another -o")
    target = targets.get(config.target)
    ok, why = target.is_available()
    if not ok:
        raise EdgegateError(f"target {config.target} is not available here: {why}")

    timer = StepTimer(on_step=on_step)
    with timer.step("load"):
        loaded = load(model_path, trust_model=config.trust_model, model_class=config.model_class)
        model = loaded.module.eval()
        inp = input_spec(loaded.spec)
    with timer.step("find_gates"):
        gate_map = find_gates(model)
    options = ExportOptions(batch=config.batch, exit_form=ExitForm(config.exit_form))
    with timer.step("export_onnx"):
        x = sample_inputs(loaded.spec, GOLDEN_SAMPLES)
        proto = export_onnx(model, torch.from_numpy(x), inp["name"], options)
    _keep(config, out, "export_onnx.onnx", proto.SerializeToString())
    with timer.step("check"):
        problems = target.check(proto)
        if problems:
            p = problems[0]
            raise ExportError(f"target {target.name} cannot take node {p.node} ({p.op_type}): {p.message}; {p.hint}"
                              + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
    with timer.step("compile"):
        artifact = target.compile(proto, None, None)
    with timer.step("golden"):
        golden, err = _golden(artifact.files["model.onnx"], model, x, inp["name"], output_names(model),
                              config.batch)
        tol = 1e-4
        if err > tol:
            raise ExportError(f"the exported model disagrees with torch by {err:.3g} (> {tol}) on golden inputs; "
                              "please report this model")
    manifest = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "source": {"file": Path(model_path).name, "sha256": loaded.sha256, "format": str(loaded.format)},
        "model": {"class": loaded.spec.get("class"), "config": loaded.spec.get("config"),
                  "meta": loaded.spec.get("meta")},
        "target": target.name,
        "target_options": artifact.options,
        "quant": {"scheme": config.quant},
        "gates": gate_map.to_dict(),
        "export": {"opset": proto.opset_import[0].version, "batch": config.batch,
                   "exit_form": str(options.exit_form), "input": inp,
                   "outputs": output_names(model), "functions": [f.name for f in proto.functions]},
        "golden": {"samples": int(x.shape[0]), "max_abs_err_vs_torch": err, "atol": tol},
        "timings_s": timer.seconds,
    }
    files = dict(artifact.files)
    files["golden_io.npz"] = golden
    t0 = time.perf_counter()
    path = write_bundle(out, files, manifest, overwrite=config.overwrite)
    log.info("wrote %s in %.2fs (steps: %s)", path, time.perf_counter() - t0, json.dumps(timer.seconds))
    return path


def _golden(onnx_bytes: bytes, model, x: np.ndarray, input_name: str, names: list[str], batch: int | None):
    """Run the compiled ONNX here (the reference runtime) and torch; return (npz bytes, max abs error)."""
    import io

    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    step = batch or x.shape[0]
    if x.shape[0] % step:
        x = np.concatenate([x] * step)[: step * max(1, x.shape[0] // step)]
    outs: list[list[np.ndarray]] = [[] for _ in names]
    refs: list[list[np.ndarray]] = [[] for _ in names]
    with torch.no_grad():
        for i in range(0, x.shape[0], step):
            chunk = x[i:i + step]
            for acc, y in zip(outs, session.run(names, {input_name: chunk}), strict=True):
                acc.append(y)
            ref = model(torch.from_numpy(chunk))
            ref = ref if isinstance(ref, tuple) else (ref,)
            for acc, y in zip(refs, ref, strict=True):
                acc.append(y.numpy())
    got = [np.concatenate(a) for a in outs]
    want = [np.concatenate(a) for a in refs]
    err = max(float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64))))
              for g, w in zip(got, want, strict=True))
    buf = io.BytesIO()
    np.savez(buf, **{f"input.{input_name}": x}, **{f"output.{k}": v for k, v in zip(names, got, strict=True)})
    return buf.getvalue(), err


def _keep(config: ExportConfig, out: Path, name: str, data: bytes) -> None:
    if not config.keep_intermediate:
        return
    steps = out.with_name(out.name + ".steps")
    steps.mkdir(parents=True, exist_ok=True)
    (steps / name).write_bytes(data)
