"""Golden I/O of an export: the compiled model run here next to its torch reference, checked and stored.

Stage: golden (after compile, before the bundle is written). Input: the bundle's ``model.onnx`` (or the
target's own runner), the torch model the outputs must follow, the golden samples (every model input)
and the output names. Output: ``golden_io.npz`` bytes (``input.<name>``, ``output.<name>``) that
``edgegate bench`` checks on the device, and the record for the manifest (errors, tolerance). The golden
samples themselves are chosen here too (``golden_inputs``), before the torch model is exported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgegate.data import Inputs, TensorSpec, load_data
from edgegate.errors import ExportError
from edgegate.loading.inputs import model_inputs, value_range
from edgegate.metrics import output_agreement

EXACT_ATOL = 1e-4
MIN_TOP1_AGREEMENT = 0.9


def check_golden(got: list[np.ndarray], want: list[np.ndarray], names: list[str], exact: bool,
                 also: list[np.ndarray] | None = None) -> dict:
    """Float graphs must match torch to float tolerance; integer graphs must follow their fake-quant model.

    ``atol`` is what ``edgegate bench`` allows on the device against the outputs stored here: the
    same runtime on another CPU may pick other integer kernels, so quantized bundles get a tolerance
    of 2% of the output range rather than float round-off. ``also``: outputs of the float model, for a
    graph the target runs partly in float (a top-1 the float model picks is then as good as the reference's).
    """
    stats = output_agreement(got, want, names)
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


def sample_inputs(spec: dict, n: int, seed: int = 0, inputs: Sequence[TensorSpec] = ()) -> Inputs:
    """``n`` samples of every model input: the test split of the dataset the model names (single-input
    models), else seeded random ones (integers in the input's recorded range)."""
    specs = tuple(inputs) or model_inputs(spec)
    dataset = (spec.get("meta") or {}).get("dataset")
    if dataset and len(specs) == 1:
        s = specs[0]
        x = load_data(dataset, [s.name], {s.name: s.shape}).test_inputs()[:n]
        return Inputs({s.name: np.ascontiguousarray(x.astype(s.dtype))})
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        shape = (n, *(1 if d is None else d for d in s.shape))
        if np.dtype(s.dtype).kind in "iub":
            low, high = value_range(spec, s.name)
            out[s.name] = rng.integers(low, max(high, low + 1), size=shape).astype(s.dtype)
        else:
            out[s.name] = rng.standard_normal(shape).astype(s.dtype)
    return Inputs(out)


def golden_inputs(examples: Inputs | None, spec: dict, specs: Sequence[TensorSpec], data: Any, n: int) -> Inputs:
    """Golden samples: the example inputs given from Python; the model's own dataset (test split); rows of
    the --calib data (held-out first); else seeded random samples."""
    if examples is not None:
        return examples
    if data is not None and not (spec.get("meta") or {}).get("dataset"):
        return data.model_inputs([s.name for s in specs])[:n]
    return sample_inputs(spec, n, inputs=specs)


def whole_batches(x: Inputs, batch: int | None) -> Inputs:
    """``x`` tiled or trimmed to whole static batches (every input alike); as it is for a dynamic batch."""
    n = len(x)
    step = batch or n
    return x[np.arange(step * max(1, n // step)) % n] if n % step else x


def torch_outputs(model: Any, x: Inputs, batch: int | None) -> list[np.ndarray]:
    """The torch model's outputs on `whole_batches` of ``x``, one batch per call as `run_golden` runs it: its
    ``model`` argument, computed before compile so the torch model need not be held through it."""
    import torch

    x = whole_batches(x, batch)
    step = batch or len(x)
    refs: list[list[np.ndarray]] = []
    with torch.no_grad():
        for i in range(0, len(x), step):
            ref = x[i:i + step].map(torch.from_numpy).run(model)
            ref = ref if isinstance(ref, tuple) else (ref,)
            refs = refs or [[] for _ in ref]
            for acc, y in zip(refs, ref, strict=True):
                acc.append(y.numpy())
    return [np.concatenate(a) for a in refs]


def run_golden(onnx_bytes: bytes, model: Any, x: Inputs, names: list[str], batch: int | None, runner: Any = None,
               reference_only: bool = False) -> tuple[bytes, Inputs, list[np.ndarray], list[np.ndarray]]:
    """Run the compiled model here and torch on every input of ``x``: (npz bytes, inputs, device outputs,
    torch outputs). The npz holds ``input.<name>`` per model input and ``output.<name>`` per output.
    ``model``: the torch model, or its outputs from `torch_outputs` (same ``x`` and ``batch``).

    The device outputs come from the target's own ``runner`` when it runs on this machine, else from
    ONNX Runtime on the bundle's ``model.onnx`` (the reference runtime). ``reference_only``: the graph
    is another target's (trt), so ORT runs it with basic optimizations only: its CPU fusions would
    quantize activations on the fly (DQ(int8 weight) -> MatMul), which the target does not do.
    """
    import io

    import onnxruntime as ort

    if runner is None:
        so = ort.SessionOptions()
        if reference_only:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        session = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])

        def run(chunk: Inputs) -> list[np.ndarray]:
            return session.run(names, dict(chunk.arrays))
    else:
        def run(chunk: Inputs) -> list[np.ndarray]:
            out = runner.run(dict(chunk.arrays))
            return [out[k] for k in names]
    x = whole_batches(x, batch)  # whole static batches only
    step = batch or len(x)
    outs: list[list[np.ndarray]] = [[] for _ in names]
    for i in range(0, len(x), step):
        for acc, y in zip(outs, run(x[i:i + step]), strict=True):
            acc.append(y)
    got = [np.concatenate(a) for a in outs]
    want = model if isinstance(model, list) else torch_outputs(model, x, batch)
    if len(want) != len(names):
        raise ExportError(f"the torch model gives {len(want)} output(s), the graph {len(names)} ({', '.join(names)})")
    buf = io.BytesIO()
    np.savez(buf, **{f"input.{k}": v for k, v in x.arrays.items()},
             **{f"output.{k}": v for k, v in zip(names, got, strict=True)})
    return buf.getvalue(), x, got, want
