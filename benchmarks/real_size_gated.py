"""Section 6's gated rows: a ~70M-parameter early-exit MLP and a tiny Hugging Face Mixtral folder.

Both go through the command line a user runs (``edgegate export``, in a child process at the full size so
its wall time and peak RSS, ``ru_maxrss``, are the export's own), fp32 and int8, and are timed by ONNX
Runtime with one intra-op thread at batch 1, interleaved:

* ``early_exit_mlp``: ``edgegate.nn.ExitMLP`` (1024 inputs, 5 stages of 4096, 10 classes: 71.5M parameters)
  with seeded random weights, exported in the default dynamic-batch form (exited rows are compacted away
  before the next stage; ``quantize_static``'s calibration rejects the batch-1 ``If`` form). Random weights give no
  confident heads, so the thresholds are set from the calibration rows' own max-softmax scores: at each exit,
  the quantile that lets a quarter of the rows still running leave (``EXIT_SHARE``), so about 68 % of the rows
  leave before the last stage. The head weights are scaled so the logits have a standard deviation of 2
  (``LOGIT_STD``), which spreads the scores beyond the noise of int8. Rows: seeded Gaussian vectors, the
  checkpoint's ``.npz`` (the pipeline calibrates on its ``val`` split, ``quantize_static`` gets the same rows).
  Timed: the fp32 bundle, the int8 bundle (``--observer minmax``, ``quantize_static``'s estimator) with the
  default fidelity search, the same at ``quantize_static``'s own precision (``--fidelity-target 0``: every stage
  u8, no layer promoted; full size only) and ``quantize_static`` of the fp32 bundle, cycling over held-out
  rows, so each run exits where its row does.
  Quality: the exit each test row takes in each int8 model against fp32's, the int8 manifest's held-out exit
  agreement, and the logits' SQNR.
* ``hf_mixtral``: ``edgegate.zoo.hf.trained("mixtral")`` (32k parameters, 2 MoE layers, top-2 of 4) saved with
  ``save_pretrained`` and exported from the folder with ``--input input_ids:1x8:int64``; int8 calibrates on a
  tokens ``.npz`` with ``--holdout 0.2``. Reported: the manifest's held-out top-k set and top-1 expert
  agreement, export wall time and peak RSS, int8 against fp32 latency. A model this small is bound by ONNX
  Runtime's per-node overhead, not arithmetic, so its latency ratio is reported with no goal.

At the smoke size (CI) only the MLP runs, 64 wide with 3 stages, exported in this process (no peak RSS of its
own) and quantized without the fidelity search (``--fidelity-target 0``); the Mixtral folder's training and two
exports would take longer than the whole smoke section.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import (
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

THREADS = 1
OBSERVER = "minmax"
SPLIT_VAL = 0.15  # edgegate.data's val fraction of a user .npz: the rows the pipeline calibrates on
EXIT_SHARE = 0.25  # of the rows still running, the share each exit lets leave on the calibration rows
LOGIT_STD = 2.0
FULL = {"exit": {"in_features": 1024, "hidden": 4096, "n_classes": 10, "n_stages": 5}, "calib": 128, "test": 64,
        "exit_int8_args": (), "child": True, "plain": True}
# Smoke: plain gate-aware int8 (--fidelity-target 0, one calibration attempt): the search's retries would take
# most of the smoke budget on their own.
SMOKE = {"exit": {"in_features": 32, "hidden": 64, "n_classes": 10, "n_stages": 3}, "calib": 64, "test": 32,
         "exit_int8_args": ("--fidelity-target", "0"), "child": False, "plain": False}
HF_CALIB, HF_HELD = 256, 64  # token windows of 8; --holdout 0.2 of the 320 rows in tokens.npz
EXIT_SPEED_GOAL = 1.0  # the int8 exit MLP no slower than its fp32 bundle at batch 1

# The child runs the CLI and reports its own peak RSS (ru_maxrss, KiB on Linux): the export's, not the caller's.
_CHILD = """
import contextlib, io, json, resource, sys, time
from edgegate.cli import main
args = json.loads(sys.argv[1])
t0 = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    code = main(args)
wall = time.perf_counter() - t0
if code:
    sys.exit(code)
print(json.dumps({"wall_s": round(wall, 3),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def export(args: list[str], out: Path, child: bool) -> dict[str, Any]:
    """``edgegate export ARGS -o OUT``: wall time, peak RSS (MiB, child only) and the pipeline's step timings."""
    args = ["export", *map(str, args), "-o", str(out), "--overwrite"]
    if child:
        env = child_env()
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], env=env, capture_output=True,
                              text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"export of {out.name} failed: {last[:300]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1]) | {"process_wall_s": round(wall, 3)}
    else:
        from edgegate.cli import main

        t0 = time.perf_counter()
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main(args)
        if code:
            raise RuntimeError(f"export of {out.name} failed: {err.getvalue().strip()[-300:]}")
        wall = round(time.perf_counter() - t0, 3)
        result = {"wall_s": wall, "peak_rss_mib": None, "process_wall_s": wall}
    manifest = json.loads((out / "manifest.json").read_text())
    return result | {"steps_s": manifest["timings_s"]}


def _fidelity(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text())["quant"].get("fidelity") or {}


# ------------------------------------------------------------------------------------------------ early exit


def exit_checkpoint(root: Path, spec: dict[str, Any]) -> tuple[Path, np.ndarray, np.ndarray, dict[str, Any]]:
    """ExitMLP with seeded weights and thresholds set on the calibration rows; (checkpoint, calibration rows,
    test rows, the model's size and calibration-row exit shares)."""
    import torch

    from edgegate.data import load_data
    from edgegate.loading import save
    from edgegate.nn import ExitMLP

    cfg = spec["exit"]
    n = int(np.ceil(spec["calib"] / SPLIT_VAL)) + 1
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((n, cfg["in_features"])).astype(np.float32)
    test = rng.standard_normal((spec["test"], cfg["in_features"])).astype(np.float32)
    data = root / "exit_mlp.calib.npz"
    np.savez(data, x=rows)
    calib = load_data(str(data), ["x"], {"x": (cfg["in_features"],)}).split("val").input()[:spec["calib"]]
    torch.manual_seed(0)
    model = ExitMLP(**cfg).eval()
    x = torch.from_numpy(calib)
    with torch.no_grad():
        for head, logits in zip(model.heads, model.forward_all(x), strict=True):
            scale = LOGIT_STD / float(logits.std())  # ReLU stages shrink activations: rescale the heads
            head.weight.mul_(scale)
            head.bias.mul_(scale)
        scores = [torch.softmax(h, -1).amax(-1).numpy() for h in model.forward_all(x)]
    running, thresholds = np.ones(len(calib), bool), []
    for s in scores[:-1]:  # each exit lets the top EXIT_SHARE of the rows still running leave
        t = float(np.quantile(s[running], 1.0 - EXIT_SHARE))
        thresholds.append(t)
        running &= s < t
    model.set_thresholds(thresholds)
    with torch.no_grad():
        _, exit_index = model(x)
    shares = np.bincount(exit_index.numpy(), minlength=model.n_exits) / len(calib)
    path = root / "exit_mlp.pt"
    save(model, path, meta={"dataset": str(data), "seed": 0,
                            "inputs": [{"name": "x", "shape": [cfg["in_features"]], "dtype": "float32"}]})
    info = {"parameters": int(sum(p.numel() for p in model.parameters())), "config": cfg,
            "thresholds": [round(t, 5) for t in thresholds],
            "calib_exit_shares": [round(float(s), 4) for s in shares]}
    return path, np.ascontiguousarray(calib), test, info


def _outputs(session: Any, test: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits and exit index per test row, run one row at a time (batch 1)."""
    names = [o.name for o in session.get_outputs()]
    logits, exits = [], []
    for row in batches(test, 1, len(test)):
        out = dict(zip(names, session.run(None, {"x": row}), strict=True))
        logits.append(out[names[0]])
        exits.append(next((v.reshape(-1) for k, v in out.items() if "exit" in k), None))
    return np.concatenate(logits), (np.concatenate(exits) if exits[0] is not None else None)


def bench_exit(ws: Workspace, sizes: Sizes, spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.cpu_int8 import quantize_static_peer

    root = ws.root / "real-exit_mlp"
    root.mkdir(exist_ok=True)
    ckpt, calib, test, info = exit_checkpoint(root, spec)
    # fp32; int8 with the defaults (the fidelity search); at full size also int8 at quantize_static's own
    # precision (every layer u8, no search: --fidelity-target 0), which separates the kernels' speed from what
    # the search spends on fidelity.
    int8 = ("--quant", "int8", "--observer", OBSERVER)
    configs = {"fp32": ("--quant", "fp32"), "int8": (*int8, *spec["exit_int8_args"])}
    if spec["plain"]:
        configs["int8_plain"] = (*int8, "--fidelity-target", "0")
    exports = {q: export([ckpt, *a], root / f"exit_mlp-{q}.edgegate", spec["child"]) for q, a in configs.items()}
    fp32 = root / "exit_mlp-fp32.edgegate" / "model.onnx"
    models = {"fp32": fp32.read_bytes()}
    for q, name in (("int8", "edgegate"), ("int8_plain", "edgegate_plain")):
        if q in exports:
            models[name] = (root / f"exit_mlp-{q}.edgegate" / "model.onnx").read_bytes()
    models["ort_static"], pre = quantize_static_peer(str(fp32), root, "x", calib)
    sessions = {k: ort_session(v, THREADS) for k, v in models.items()}
    ref, ref_exit = _outputs(sessions["fp32"], test)
    quality = {}
    for k in (k for k in models if k != "fp32"):
        got, got_exit = _outputs(sessions[k], test)
        quality[k] = {**output_quality(got, ref), "exit_agreement": None if got_exit is None or ref_exit is None
                      else round(float(np.mean(got_exit == ref_exit)), 4)}
    fid = _fidelity(root / "exit_mlp-int8.edgegate")
    search = json.loads((root / "exit_mlp-int8.edgegate" / "manifest.json").read_text())["quant"].get("search") or {}
    chosen = search.get("chosen") or {}
    # The fidelity search's outcome explains the int8 speed: a16 stages (16-bit activations) run slower than u8.
    quality["edgegate"]["search"] = {"met": search.get("met"), "tries": len(search.get("tries") or []),
                                     "means": chosen.get("means"), "a16_layers": chosen.get("a16_layers"),
                                     "float_layers": chosen.get("float_layers")}
    quality["edgegate"]["manifest_exit_agreement"] = fid.get("summary")
    quality["edgegate"]["manifest_measured_on"] = fid.get("measured_on")
    feeds = batches(test, 1, len(test))
    t = time_interleaved({k: cycling(lambda f, s=s: s.run(None, {"x": f}), feeds) for k, s in sessions.items()}, sizes)
    latency = {"threads": THREADS, "batch": 1, **{f"{k}_ms": round(v.median_ms, 4) for k, v in t.items()},
               "speedup_vs_fp32": ratio(t["fp32"], t["edgegate"]),
               "speedup_vs_ort_static": ratio(t["ort_static"], t["edgegate"]),
               "ort_static_speedup_vs_fp32": ratio(t["fp32"], t["ort_static"]),
               **({"plain_speedup_vs_ort_static": ratio(t["ort_static"], t["edgegate_plain"]),
                   "plain_speedup_vs_fp32": ratio(t["fp32"], t["edgegate_plain"])} if "edgegate_plain" in t else {}),
               "timings": {k: v.to_dict() for k, v in t.items()}}
    test_exits = None if ref_exit is None else [round(float(s), 4) for s in np.bincount(
        ref_exit.astype(np.int64), minlength=spec["exit"]["n_stages"]) / len(test)]
    return {"model": "early_exit_mlp", **info, "test_exit_shares_fp32": test_exits, "ort_static_preprocessed": pre,
            "quality": quality, "latency": latency, "export": exports}


# ---------------------------------------------------------------------------------------- Hugging Face MoE


def bench_hf(ws: Workspace, sizes: Sizes, spec: dict[str, Any]) -> dict[str, Any]:
    from edgegate.zoo import hf

    root = ws.root / "real-hf_mixtral"
    root.mkdir(exist_ok=True)
    model = hf.trained("mixtral")
    folder = root / "mixtral"
    model.lm.save_pretrained(folder)
    _, calib, held = hf.markov()
    tokens = root / "tokens.npz"
    np.savez(tokens, input_ids=np.concatenate([calib.input()[:HF_CALIB], held.input()[:HF_HELD]]))
    exports, sessions = {}, {}
    for q in ("fp32", "int8"):
        extra = ["--calib", tokens, "--holdout", "0.2"] if q == "int8" else []
        out = root / f"mixtral-{q}.edgegate"
        exports[q] = export([folder, "--input", f"input_ids:1x{hf.CONTEXT}:int64", "--quant", q, *extra], out,
                            spec["child"])
        sessions[q] = ort_session((out / "model.onnx").read_bytes(), THREADS)
    feeds = batches(held.input()[HF_HELD:2 * HF_HELD], 1, 16)
    t = time_interleaved({q: cycling(lambda f, s=s: s.run(None, {"input_ids": f}), feeds)
                          for q, s in sessions.items()}, sizes)
    latency = {"threads": THREADS, "batch": 1, "tokens": hf.CONTEXT,
               **{f"{q}_ms": round(v.median_ms, 4) for q, v in t.items()},
               "int8_speedup_vs_fp32": ratio(t["fp32"], t["int8"]) if "int8" in t else None,
               "timings": {q: v.to_dict() for q, v in t.items()}}
    quality = None
    if "int8" in exports:
        fid = _fidelity(root / "mixtral-int8.edgegate")
        quality = {"measured_on": fid.get("measured_on"), **(fid.get("summary") or {}),
                   "per_router": {k: {m: g.get(m) for m in ("topk_set_agreement", "top1_expert_agreement")}
                                  for k, g in (fid.get("gates") or {}).items()},
                   "top1_token_agreement": fid.get("top1_agreement"), "logits_sqnr_db": fid.get("output_sqnr_db")}
    return {"model": "hf_mixtral", "parameters": hf.n_params(model), "bound": "per-node overhead (ONNX Runtime)",
            "input": f"input_ids:1x{hf.CONTEXT}:int64", "quality": quality, "latency": latency, "export": exports}


ROWS = {"hf_mixtral": bench_hf, "early_exit_mlp": bench_exit}
SMOKE_ROWS = ("early_exit_mlp",)  # the Mixtral folder's training and exports alone would pass the smoke budget


def run_rows(ws: Workspace, sizes: Sizes, names: tuple[str, ...]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows, errors) of the gated rows in ``names``."""
    spec = SMOKE if sizes.smoke else FULL
    rows, errors = [], []
    for name in names:
        try:
            rows.append(ROWS[name](ws, sizes, spec))
        except Exception as e:  # one row failing is a result, not a crash
            errors.append({"model": name, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"})
    return rows, errors


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in rows:
        if m["model"] != "early_exit_mlp":  # hf_mixtral: per-node-overhead bound, reported without a goal
            continue
        one, q = m["latency"], m["quality"]
        t, e = one["timings"]["fp32"], one["timings"]["edgegate"]
        p = m["parameters"]
        size = f"{p / 1e6:.0f}M" if p >= 1e6 else f"{p / 1e3:.0f}k"
        out.append(goal(f"early_exit_mlp {size}: INT8 >= {EXIT_SPEED_GOAL:g}x FP32 (batch 1, "
                        "1 thread)", f">= {EXIT_SPEED_GOAL}", one["speedup_vs_fp32"],
                        one["speedup_vs_fp32"] >= EXIT_SPEED_GOAL,
                        f"fastest repeats {t['min_ms'] / e['min_ms']:.3f}x"))
        peer_t = one["timings"]["ort_static"]
        out.append(goal(f"early_exit_mlp {size}: INT8 >= 1.0x quantize_static (batch 1, 1 thread)", ">= 1.0",
                        one["speedup_vs_ort_static"], one["speedup_vs_ort_static"] >= 1.0,
                        f"fastest repeats {peer_t['min_ms'] / e['min_ms']:.3f}x; search chose "
                        f"{q['edgegate']['search']['means']}"))
        if "plain_speedup_vs_ort_static" in one:
            plain = one["timings"]["edgegate_plain"]
            out.append(goal(f"early_exit_mlp {size}: INT8 at quantize_static's precision (--fidelity-target 0) "
                            ">= 1.0x quantize_static (batch 1, 1 thread)", ">= 1.0",
                            one["plain_speedup_vs_ort_static"], one["plain_speedup_vs_ort_static"] >= 1.0,
                            f"fastest repeats {peer_t['min_ms'] / plain['min_ms']:.3f}x; exit agreement "
                            f"{q['edgegate_plain']['exit_agreement']} vs {q['ort_static']['exit_agreement']}"))
        ours, peer = q["edgegate"]["exit_agreement"], q["ort_static"]["exit_agreement"]
        if ours is not None and peer is not None:
            out.append(goal("early_exit_mlp: exit agreement with FP32 >= quantize_static's", ">= peer",
                            round(ours - peer, 4), ours >= peer, f"{ours} vs {peer} on the test rows"))
    return out
