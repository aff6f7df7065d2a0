"""Section 6, real-size CNNs: ResNet-18 and MobileNetV3-small at 224 x 224, INT8 vs FP32 vs ``quantize_static``.

The zoo models of section 1 run in microseconds, where ONNX Runtime's per-node cost dominates; these two
run in milliseconds, where arithmetic does. Both architectures are written out in ``benchmarks.models``
(layer for layer as torchvision defines them) with seeded random weights and BatchNorm statistics set on
real image crops (``recalibrate_batchnorm``), so activations have the per-channel scale of a trained net.

Data: 224 x 224 crops (random position, random horizontal flip, ImageNet normalization) of the two photos
scikit-learn ships (``sklearn.datasets.load_sample_images``): the checkpoint's ``.npz`` dataset, whose val
split (64 crops) is what the pipeline calibrates on and what ``quantize_static`` gets, and 64 other test
crops. Per model, three ONNX files run by ONNX Runtime
with the same session options (all optimizations, 1 intra-op thread, batch 1 and 32):

* ``fp32``: the ``edgegate export --quant fp32`` bundle's ``model.onnx``,
* ``edgegate``: the ``--quant int8 --observer minmax`` bundle's (BatchNorm folded, every op that runs quantized
  quantized, regions measured slower in INT8 kept float by the cpu target). Min-max is the range estimator
  ``quantize_static`` uses, so the comparison is about placement and kernels, not about the estimator,
* ``ort_static``: ``onnxruntime.quantization.quantize_static`` of the FP32 file on the same 64 calibration
  crops (QDQ, uint8 activations, int8 per-channel weights, after ``quant_pre_process``).

Quality: output SQNR (dB) and top-1 agreement against the FP32 outputs on the test crops (random weights:
no accuracy to report). Each export runs in a child process, so its wall time and peak RSS
(``ru_maxrss`` of that process) are the export's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import real_size_gated
from benchmarks.harness import (
    BenchmarkError,
    Sizes,
    batches,
    child_env,
    cycling,
    goal,
    ort_session,
    output_quality,
    ratio,
    time_interleaved,
)
from benchmarks.workspace import Workspace

MODELS = {"resnet18": "benchmarks.models:ResNet18", "mobilenet_v3_small": "benchmarks.models:MobileNetV3Small"}
FULL = {"models": tuple(MODELS), "size": 224, "calib": 64, "test": 64, "batches": (1, 32), "config": {},
        "child": True}
# Smoke size (CI): a ResNet-18 of width 8 at 32 x 32, exported in this process (no peak RSS of its own).
SMOKE = {"models": ("resnet18",), "size": 32, "calib": 16, "test": 16, "batches": (1, 4),
         "config": {"resnet18": {"width": 8, "n_classes": 10}}, "child": False}
SPEEDUP_GOAL = 3.0  # ResNet-18 INT8 vs FP32, batch 1, 1 thread
OBSERVER = "minmax"  # the range estimator of quantize_static, the peer
SPLIT_VAL = 0.15  # edgegate.data's val fraction of a user .npz: the rows the pipeline calibrates on
THREADS = 1
ROWS_ENV = "EDGEGATE_BENCH_REAL_SIZE"  # comma-separated rows to run (default: all)
_MEAN, _STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def image_crops(n: int, size: int, seed: int) -> np.ndarray:
    """``n`` normalized [3, size, size] crops of scikit-learn's two sample photos (deterministic)."""
    from sklearn.datasets import load_sample_images

    images = [np.asarray(im, np.float32) / 255.0 for im in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        im = images[i % len(images)]
        y, x = rng.integers(0, im.shape[0] - size + 1), rng.integers(0, im.shape[1] - size + 1)
        crop = im[y:y + size, x:x + size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = ((crop - _MEAN) / _STD).transpose(2, 0, 1)
    return out


def make_checkpoint(root: Path, name: str, size: int, calib_rows: int,
                    config: dict[str, Any]) -> tuple[Path, np.ndarray]:
    """The model with seeded weights and BatchNorm statistics from image crops, saved as an edgegate checkpoint
    whose dataset is an ``.npz`` of crops. The pipeline calibrates on that file's ``val`` split (15 %), so the
    file holds enough crops for ``calib_rows`` of them to be in it; returns (checkpoint, the val-split crops),
    the very rows ``quantize_static`` gets."""
    import torch

    from benchmarks import models
    from edgegate.data import load_data
    from edgegate.loading import save

    n = int(np.ceil(calib_rows / SPLIT_VAL)) + 1
    crops = image_crops(n, size, seed=1)
    data = root / f"{name}.calib.npz"
    np.savez(data, x=crops)
    calib = load_data(str(data), ["x"], {"x": (3, size, size)}).split("val").input()[:calib_rows]
    cls = getattr(models, MODELS[name].split(":")[1])
    torch.manual_seed(0)
    model = cls(**config)
    models.recalibrate_batchnorm(model, torch.from_numpy(crops[:max(calib_rows, 64)]))
    path = root / f"{name}.pt"
    save(model, path, meta={"dataset": str(data), "seed": 0,
                            "inputs": [{"name": "x", "shape": [3, size, size], "dtype": "float32"}]})
    return path, np.ascontiguousarray(calib)


# The child reports its own peak RSS (ru_maxrss, KiB on Linux): the export's, not this process's.
_CHILD = """
import json, resource, sys, time
from edgegate.pipeline import ExportConfig, run_export
ckpt, out, quant, cls, observer = sys.argv[1:6]
t0 = time.perf_counter()
path = run_export(ckpt, out, ExportConfig(quant=quant, observer=observer, overwrite=True, model_class=cls))
print(json.dumps({"wall_s": round(time.perf_counter() - t0, 3),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "timings_s": json.loads((path / "manifest.json").read_text())["timings_s"]}))
"""


def export_here(ckpt: Path, out: Path, quant: str, cls: str) -> dict[str, Any]:
    """``run_export`` in this process: wall time and step timings (peak RSS is this process's, not reported)."""
    from edgegate.pipeline import ExportConfig, run_export

    t0 = time.perf_counter()
    path = run_export(ckpt, out, ExportConfig(quant=quant, observer=OBSERVER, overwrite=True, model_class=cls))
    wall = round(time.perf_counter() - t0, 3)
    return {"wall_s": wall, "peak_rss_mib": None, "process_wall_s": wall,
            "timings_s": json.loads((path / "manifest.json").read_text())["timings_s"]}


def export_child(ckpt: Path, out: Path, quant: str, cls: str) -> dict[str, Any]:
    """``run_export`` in a child process: its wall time, step timings and peak RSS (MiB)."""
    env = child_env()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(ckpt), str(out), quant, cls, OBSERVER], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        last = (stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"export {quant} of {ckpt.name} failed: {last[:300]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["process_wall_s"] = round(wall, 3)
    return result


def bench_model(ws: Workspace, name: str, sizes: Sizes, spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.cpu_int8 import quantize_static_peer

    root = ws.root / f"real-{name}"
    root.mkdir(exist_ok=True)
    size = spec["size"]
    test = image_crops(spec["test"], size, seed=2)
    ckpt, calib = make_checkpoint(root, name, size, spec["calib"], spec["config"].get(name, {}))
    exports = {}
    export = export_child if spec["child"] else export_here
    for quant in ("fp32", "int8"):
        exports[quant] = export(ckpt, root / f"{name}-{quant}.edgegate", quant, MODELS[name])
    models = {"fp32": (root / f"{name}-fp32.edgegate" / "model.onnx").read_bytes(),
              "edgegate": (root / f"{name}-int8.edgegate" / "model.onnx").read_bytes()}
    models["ort_static"], pre = quantize_static_peer(str(root / f"{name}-fp32.edgegate" / "model.onnx"), root, "x",
                                                     calib)
    sessions = {k: ort_session(v, THREADS) for k, v in models.items()}
    ref = np.concatenate([sessions["fp32"].run(None, {"x": b})[0] for b in batches(test, 8, len(test) // 8)])
    quality = {}
    for k in ("edgegate", "ort_static"):
        got = np.concatenate([sessions[k].run(None, {"x": b})[0] for b in batches(test, 8, len(test) // 8)])
        quality[k] = output_quality(got, ref)
    latency = []
    for batch in spec["batches"]:
        feeds = batches(test, batch, max(1, min(8, len(test) // batch)))
        fns = {k: cycling(lambda f, s=s: s.run(None, {"x": f}), feeds) for k, s in sessions.items()}
        t = time_interleaved(fns, sizes)
        latency.append({"threads": THREADS, "batch": batch, **{f"{k}_ms": round(v.median_ms, 4) for k, v in t.items()},
                        "speedup_vs_fp32": ratio(t["fp32"], t["edgegate"]),
                        "speedup_vs_ort_static": ratio(t["ort_static"], t["edgegate"]),
                        "ort_static_speedup_vs_fp32": ratio(t["fp32"], t["ort_static"]),
                        "timings": {k: v.to_dict() for k, v in t.items()}})
    manifest = json.loads((root / f"{name}-int8.edgegate" / "manifest.json").read_text())
    return {"model": name, "input": [3, size, size], "parameters": _parameters(ckpt, MODELS[name]),
            "ort_static_preprocessed": pre, "quality": quality, "latency": latency,
            "export": {q: {k: v for k, v in e.items() if k != "timings_s"} | {"steps_s": e["timings_s"]}
                       for q, e in exports.items()},
            "latency_aware": manifest["target_options"].get("latency_aware_decisions")}


def _parameters(ckpt: Path, cls: str) -> int:
    from edgegate.loading import load

    return int(sum(p.numel() for p in load(ckpt, model_class=cls).module.parameters()))


def selected(smoke: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(CNNs, gated rows) to run: all of them, or those named in ``EDGEGATE_BENCH_REAL_SIZE`` (comma-separated),
    so a full-size run of one row need not pay for the others."""
    cnns = (SMOKE if smoke else FULL)["models"]
    gated = real_size_gated.SMOKE_ROWS if smoke else tuple(real_size_gated.ROWS)
    names = [n.strip() for n in os.environ.get(ROWS_ENV, "").split(",") if n.strip()]
    if not names:
        return cnns, gated
    unknown = sorted(set(names) - set(MODELS) - set(gated))
    if unknown:  # a typo must not pass as a run of nothing
        raise BenchmarkError(f"{ROWS_ENV}: unknown rows {', '.join(unknown)}; use {', '.join([*MODELS, *gated])}")
    return tuple(n for n in names if n in MODELS), tuple(n for n in names if n in gated)


def run(ws: Workspace, sizes: Sizes) -> dict[str, Any]:
    spec = SMOKE if sizes.smoke else FULL
    cnns, gated_names = selected(sizes.smoke)
    rows, errors = [], []
    for name in cnns:
        try:
            rows.append(bench_model(ws, name, sizes, spec))
        except Exception as e:  # one model failing is a result, not a crash
            errors.append({"model": name, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"})
    gated, gated_errors = real_size_gated.run_rows(ws, sizes, gated_names)
    return {"method": __doc__.split("\n\n", 1)[1].strip() + "\n\n" + real_size_gated.__doc__.strip(),
            "models": rows, "gated": gated, "errors": errors + gated_errors,
            "goals": _goals(rows) + real_size_gated.goals(gated), "input_size": spec["size"]}


def _row(m: dict[str, Any], batch: int) -> dict[str, Any] | None:
    return next((r for r in m["latency"] if r["batch"] == batch), None)


def _spread(row: dict[str, Any], peer: str) -> str:
    """The same ratio from each side's fastest and slowest repeat: how far the load moved it in this run."""
    t, e = row["timings"][peer], row["timings"]["edgegate"]
    return (f"fastest repeats {t['min_ms'] / e['min_ms']:.3f}x, "
            f"range {t['min_ms'] / e['max_ms']:.3f}-{t['max_ms'] / e['min_ms']:.3f}x")


def _goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    goals = []
    for m in rows:
        one, many = _row(m, 1), m["latency"][-1]
        if m["model"] == "resnet18":
            goals.append(goal(f"resnet18: INT8 >= {SPEEDUP_GOAL:g}x FP32 (batch 1, 1 thread)", f">= {SPEEDUP_GOAL}",
                              one["speedup_vs_fp32"], one["speedup_vs_fp32"] >= SPEEDUP_GOAL, _spread(one, "fp32")))
            goals.append(goal("resnet18: INT8 >= 1.0x quantize_static (batch 1, 1 thread)", ">= 1.0",
                              one["speedup_vs_ort_static"], one["speedup_vs_ort_static"] >= 1.0,
                              _spread(one, "ort_static")))
            q = m["quality"]
            goals.append(goal("resnet18: output SQNR >= quantize_static's", ">= peer (dB)",
                              round(q["edgegate"]["sqnr_db"] - q["ort_static"]["sqnr_db"], 2),
                              q["edgegate"]["sqnr_db"] >= q["ort_static"]["sqnr_db"],
                              f"{q['edgegate']['sqnr_db']} vs {q['ort_static']['sqnr_db']} dB"))
        else:
            goals.append(goal(f"{m['model']}: INT8 bundle >= 1.0x its FP32 bundle (batch 1, 1 thread)", ">= 1.0",
                              one["speedup_vs_fp32"], one["speedup_vs_fp32"] >= 1.0, _spread(one, "fp32")))
        goals.append(goal(f"{m['model']}: INT8 bundle no slower than FP32 at batch {many['batch']}", ">= 1.0",
                          many["speedup_vs_fp32"], many["speedup_vs_fp32"] >= 1.0, _spread(many, "fp32")))
    return goals
