"""Section 8, sparse MoE on cpu and export memory: ``edgegate.nn`` MoE bundles vs ONNX Runtime's own MoE ops.

Part 1, decode speed. One MoE block (``benchmarks.models.MoEBlock``: d 512, SwiGLU FFN 2048, softmax top-2;
seeded random weights, calibrated on random normal token rows) with 8 experts and with 2, each exported by
``edgegate export --target cpu`` as ``fp32`` and ``int8`` bundles (the cpu target writes the sparse form:
per-expert gather/scatter in float, ``If(tokens <= 8: QMoE, else int8 gather/scatter)`` in int8). Timed with
one intra-op thread, interleaved in one loop: at 1 token (batch-1 decode) E=8 against E=2 (only the routed
experts compute, so 8 experts should cost little more than 2; the bare ORT ops below, E=8 against E=2, are
timed beside them for reference, and so is the memory floor: reading the routed experts' weight bytes alone,
E=8's set against E=2's, which no kernel can beat where E=2's int8 set stays in the cache and E=8's does
not); at 64 tokens the E=8 bundle against a bare
ONNX Runtime ``com.microsoft`` op of the same shape and precision (``MoE`` with fp32 weights, ``QMoE`` with
8-bit block-wise weights, block 128 as in the bundle's ``QMoE``), fed by the same router ``MatMul``, with the
same weights. Quality: the routes the bundle outputs against the float model's, and each output's SQNR
against the float model's.

Part 2, export memory. A ~60M-parameter causal LM of MoE blocks (``benchmarks.models.MoELM``: top-2 of 8,
d 512, FFN 2048, 2 layers, vocab 8192), exported ``fp32`` and ``int8`` for cpu, each in a child process
whose peak RSS (``ru_maxrss``) is the export's own, against the goal of 4x the FP32 weight bytes + 1 GiB.
The LM's int8 bundle is also timed against its fp32 bundle and ``quantize_static`` (1 thread, batch 1 of 16
tokens, interleaved), with the logits' SQNR and top-1 agreement against fp32 and the export's gate fidelity.
At the smoke size (CI) both parts shrink (d 64, FFN 128; a 2-layer LM of d 64, fp32 only) and export in
this process, so no peak RSS is reported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import (
    Sizes,
    child_env,
    cycling,
    goal,
    ort_session,
    output_quality,
    ratio,
    sqnr_db,
    time_interleaved,
)
from benchmarks.workspace import Workspace

BLOCK, LM = "benchmarks.models:MoEBlock", "benchmarks.models:MoELM"
FULL = {"d": 512, "hidden": 2048, "experts": (8, 2), "k": 2, "rows": 2048, "child": True,
        "lm": {"vocab": 8192, "ctx": 16, "d_model": 512, "d_hidden": 2048, "n_experts": 8, "k": 2, "n_layers": 2},
        "lm_rows": 512, "lm_quants": ("fp32", "int8")}
SMOKE = {"d": 64, "hidden": 128, "experts": (8, 2), "k": 2, "rows": 512, "child": False,
         "lm": {"vocab": 64, "ctx": 8, "d_model": 64, "d_hidden": 128, "n_experts": 8, "k": 2, "n_layers": 2},
         "lm_rows": 256, "lm_quants": ("fp32",)}
THREADS = 1
DECODE_TOKENS, PREFILL_TOKENS = 1, 64
DECODE_GOAL = 1.3  # E=8 / E=2 at 1 token
PEER_GOAL = 1.0  # bundle / bare ORT op at 64 tokens: no slower
GIB = 1024 ** 3


# The child reports its own peak RSS (ru_maxrss, KiB on Linux): the export's, not this process's; and the
# highest RSS sampled (every 20 ms, /proc/self/statm) during each pipeline step, to show where the peak is.
_CHILD = """
import json, os, resource, sys, threading, time
from edgegate.pipeline import ExportConfig, run_export
ckpt, out, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
page, steps, state = os.sysconf("SC_PAGE_SIZE"), {}, {"step": "start", "done": False}
def sample():
    while not state["done"]:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * page / 2 ** 20
        steps[state["step"]] = round(max(steps.get(state["step"], 0.0), rss), 1)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
path = run_export(ckpt, out, ExportConfig(**config), on_step=lambda name: state.update(step=name))
state["done"] = True
print(json.dumps({"wall_s": round(time.perf_counter() - t0, 3),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "step_peak_rss_mib": steps,
                  "timings_s": json.loads((path / "manifest.json").read_text())["timings_s"]}))
"""


def export(ckpt: Path, out: Path, child: bool, **config: Any) -> dict[str, Any]:
    """``run_export`` of ``ckpt`` (in a child process when ``child``: then with its peak RSS in MiB)."""
    config = {"overwrite": True, **config}
    if not child:
        from edgegate.pipeline import ExportConfig, run_export

        t0 = time.perf_counter()
        path = run_export(ckpt, out, ExportConfig(**config))
        return {"wall_s": round(time.perf_counter() - t0, 3), "peak_rss_mib": None,
                "timings_s": json.loads((path / "manifest.json").read_text())["timings_s"]}
    env = child_env()
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(ckpt), str(out), json.dumps(config)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"export {config.get('quant')} of {ckpt.name} failed: {last[:300]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def checkpoint(root: Path, name: str, cls: str, config: dict[str, Any], data: np.ndarray, input_name: str) -> Path:
    """``cls(**config)`` with seeded weights, saved with an ``.npz`` of ``data`` as its dataset."""
    import torch

    from benchmarks import models
    from edgegate.loading import save

    npz = root / f"{name}.data.npz"
    np.savez(npz, **{input_name: data})
    torch.manual_seed(0)
    model = getattr(models, cls.split(":")[1])(**config).eval()
    path = root / f"{name}.pt"
    save(model, path, meta={"dataset": str(npz), "seed": 0, "inputs": [
        {"name": input_name, "shape": list(data.shape[1:]), "dtype": str(data.dtype)}]})
    return path


def bare_moe(model: Any, quant: str) -> bytes:
    """The block as one ONNX Runtime ``com.microsoft`` op fed by the router ``MatMul``: ``MoE`` (fp32 weights)
    or ``QMoE`` (8-bit block-wise weights); SwiGLU with gate and up rows interleaved, top-k renormalized."""
    import onnx
    from onnx import helper, numpy_helper

    from edgegate.onnx_export.passes.lower_moe import qmoe_block

    moe = model.moe
    d, e = moe.d_model, moe.n_experts
    block = qmoe_block(d, moe.d_hidden)  # 128 at d 512, FFN 2048
    w1 = np.stack([x.w1.weight.detach().numpy() for x in moe.experts])  # [E, H, d]
    w3 = np.stack([x.w3.weight.detach().numpy() for x in moe.experts])
    w2 = np.stack([x.w2.weight.detach().numpy() for x in moe.experts])  # [E, d, H]
    fc1 = np.empty((e, 2 * w1.shape[1], d), np.float32)
    fc1[:, 0::2], fc1[:, 1::2] = w1, w3
    router = moe.router.proj.weight.detach().numpy().T.copy()  # [d, E]
    inits = [numpy_helper.from_array(router, "router")]
    attrs = {"k": moe.k, "activation_type": "swiglu", "swiglu_fusion": 1, "normalize_routing_weights": 1,
             "activation_alpha": 1.0, "activation_beta": 0.0}
    if quant == "fp32":
        inits += [numpy_helper.from_array(fc1, "fc1"), numpy_helper.from_array(w2, "fc2")]
        node = helper.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], domain="com.microsoft", **attrs)
    else:
        parts = []
        for name, w in (("fc1", fc1), ("fc2", w2)):
            blocks = w.reshape(*w.shape[:2], -1, block)
            scale = np.maximum(np.abs(blocks).max(-1), 1e-12) / 127  # [E, N, K / block]
            codes = np.clip(np.round(blocks / scale[..., None]), -127, 127).astype(np.int16) + 128
            inits += [numpy_helper.from_array(codes.astype(np.uint8).reshape(w.shape), name),
                      numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale")]
            parts += [name, f"{name}_scale", ""]
        node = helper.make_node("QMoE", ["x", "logits", *parts], ["y"], domain="com.microsoft",
                                expert_weight_bits=8, block_size=block, **attrs)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "router"], ["logits"]), node], "bare_moe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["T", d])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["T", d])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft",
                                                                                                      1)])
    return proto.SerializeToString()


def weight_read(n_experts: int, expert_bytes: int, routes: list[np.ndarray]) -> Any:
    """The memory floor of one decode step: read the routed experts' weight bytes (``expert_bytes`` each) out of
    ``n_experts`` experts' worth, routes cycling as the decode tokens do. At 1 token every kernel reads these
    bytes; whether the E experts' set stays in the cache decides the E=8 / E=2 ratio before any compute."""
    n = expert_bytes // 8
    words = np.random.default_rng(n_experts).integers(0, 2**62, n_experts * n, dtype=np.int64)
    return cycling(lambda r: [np.bitwise_xor.reduce(words[e * n:(e + 1) * n]) for e in r], routes)


def decode_part(ws: Workspace, sizes: Sizes, spec: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    import torch

    from edgegate.loading import load

    root = ws.root / "moe-block"
    root.mkdir(exist_ok=True)
    d = spec["d"]
    rows = np.random.default_rng(0).standard_normal((spec["rows"], d)).astype(np.float32)
    test = np.random.default_rng(1).standard_normal((PREFILL_TOKENS, d)).astype(np.float32)
    sessions, exports, models = {}, {}, {}
    for e in spec["experts"]:
        config = {"d_model": d, "d_hidden": spec["hidden"], "n_experts": e, "k": spec["k"]}
        ckpt = checkpoint(root, f"moe{e}", BLOCK, config, rows, "x")
        models[e] = load(ckpt, model_class=BLOCK).module.eval()
        for quant in ("fp32", "int8"):
            out = root / f"moe{e}-{quant}.edgegate"
            exports[f"e{e}_{quant}"] = export(ckpt, out, spec["child"], quant=quant, model_class=BLOCK)
            sessions[f"e{e}_{quant}"] = ort_session(str(out / "model.onnx"), THREADS)
    big = max(spec["experts"])
    for quant in ("fp32", "int8"):
        for e in spec["experts"]:
            sessions[f"bare{e}_{quant}"] = ort_session(bare_moe(models[e], quant), THREADS)
    with torch.no_grad():
        want_y, want_routes = (t.numpy() for t in models[big](torch.from_numpy(test)))
    quality = {}
    for name in (f"e{big}_fp32", f"e{big}_int8", f"bare{big}_fp32", f"bare{big}_int8"):
        out = sessions[name].run(None, {"x": test})
        q = {"sqnr_db_vs_float": sqnr_db(out[0], want_y)}
        if len(out) > 1:
            q["route_set_agreement"] = round(float(np.mean(np.all(np.sort(out[1], 1) == np.sort(want_routes, 1), 1))),
                                             4)
        quality[name] = q
    feeds = {t: [np.ascontiguousarray(np.resize(np.roll(test, -i, 0), (t, d))) for i in range(8)]
             for t in (DECODE_TOKENS, PREFILL_TOKENS)}

    def fn(name: str, tokens: int):
        return cycling(lambda x, s=sessions[name]: s.run(None, {"x": x}), feeds[tokens])

    small = min(spec["experts"])
    with torch.no_grad():  # each decode token's routed experts, as the feeds cycle
        routes = {e: models[e](torch.from_numpy(test[:len(feeds[DECODE_TOKENS])]))[1].numpy() for e in spec["experts"]}
    latency, goals = [], []
    for quant in ("fp32", "int8"):
        expert_bytes = 3 * d * spec["hidden"] * (4 if quant == "fp32" else 1)  # w1, w3, w2
        t1 = time_interleaved({**{f"{kind}{e}": fn(f"{kind}{e}_{quant}" if kind == "bare" else f"e{e}_{quant}",
                                                   DECODE_TOKENS)
                                  for e in (big, small) for kind in ("bundle", "bare")},
                               **{f"read{e}": weight_read(e, expert_bytes, list(routes[e])) for e in (big, small)}},
                              sizes)
        t64 = time_interleaved({"bundle": fn(f"e{big}_{quant}", PREFILL_TOKENS),
                                "bare": fn(f"bare{big}_{quant}", PREFILL_TOKENS)}, sizes)
        decode, peer = ratio(t1[f"bundle{big}"], t1[f"bundle{small}"]), ratio(t64["bundle"], t64["bare"])
        bare_decode = ratio(t1[f"bare{big}"], t1[f"bare{small}"])
        floor = ratio(t1[f"read{big}"], t1[f"read{small}"])
        latency.append({"quant": quant, "threads": THREADS,
                        f"e{big}_1_token_ms": round(t1[f"bundle{big}"].median_ms, 4),
                        f"e{small}_1_token_ms": round(t1[f"bundle{small}"].median_ms, 4), "decode_ratio": decode,
                        f"bare{big}_1_token_ms": round(t1[f"bare{big}"].median_ms, 4),
                        f"bare{small}_1_token_ms": round(t1[f"bare{small}"].median_ms, 4),
                        "bare_decode_ratio": bare_decode, "weight_read_ratio": floor,
                        f"read{big}_1_token_ms": round(t1[f"read{big}"].median_ms, 4),
                        f"read{small}_1_token_ms": round(t1[f"read{small}"].median_ms, 4),
                        f"e{big}_{PREFILL_TOKENS}_tokens_ms": round(t64["bundle"].median_ms, 4),
                        f"bare_{PREFILL_TOKENS}_tokens_ms": round(t64["bare"].median_ms, 4), "bundle_vs_bare": peer,
                        "timings": {"1": {str(k): v.to_dict() for k, v in t1.items()},
                                    str(PREFILL_TOKENS): {k: v.to_dict() for k, v in t64.items()}}})
        op = "MoE" if quant == "fp32" else "QMoE"
        goals.append(goal(f"MoE {quant} d {d}: E={big}/E={small} at 1 token", f"<= {DECODE_GOAL}x", decode,
                          None if decode is None else decode <= DECODE_GOAL,
                          f"top-2, 1 thread; bare ORT {'MoE' if quant == 'fp32' else 'QMoE'} op: {bare_decode}x; "
                          f"reading the routed experts' weights alone: {floor}x"))
        goals.append(goal(f"MoE {quant} E={big} at {PREFILL_TOKENS} tokens: bundle vs bare ORT {op}",
                          f"<= {PEER_GOAL}x", peer, None if peer is None else peer <= PEER_GOAL,
                          "time ratio, same shape and precision, 1 thread"))
    walls = {k: {"wall_s": v["wall_s"], "peak_rss_mib": v["peak_rss_mib"]} for k, v in exports.items()}
    return {"d_model": d, "d_hidden": spec["hidden"], "k": spec["k"], "experts": list(spec["experts"]),
            "quality": quality, "latency": latency, "export": walls}, goals


def memory_part(ws: Workspace, sizes: Sizes, spec: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    root = ws.root / "moe-lm"
    root.mkdir(exist_ok=True)
    lm = spec["lm"]
    tokens = np.random.default_rng(0).integers(0, lm["vocab"], (spec["lm_rows"], lm["ctx"])).astype(np.int64)
    ckpt = checkpoint(root, "moe_lm", LM, lm, tokens, "tokens")
    from edgegate.loading import load

    params = int(sum(p.numel() for p in load(ckpt, model_class=LM).module.parameters()))
    weight_bytes = 4 * params
    budget_mib = (4 * weight_bytes + GIB) / 2 ** 20
    rows, goals = [], []
    for quant in spec["lm_quants"]:
        out = root / f"moe_lm-{quant}.edgegate"
        e = export(ckpt, out, spec["child"], quant=quant, model_class=LM)
        rss = e["peak_rss_mib"]
        per_weight = None if rss is None else round(rss * 2 ** 20 / weight_bytes, 2)
        rows.append({"quant": quant, "wall_s": e["wall_s"], "peak_rss_mib": rss, "rss_per_weight_byte": per_weight,
                     "step_peak_rss_mib": e.get("step_peak_rss_mib"),
                     "budget_mib": round(budget_mib, 1), "model_onnx_mib": round((out / "model.onnx").stat().st_size
                                                                                 / 2 ** 20, 1),
                     "steps_s": e["timings_s"]})
        if rss is not None:  # measured in a child process only (full size)
            goals.append(goal(f"MoE LM {params / 1e6:.0f}M {quant}: export peak RSS", "<= 4x FP32 weights + 1 GiB",
                              round(rss / budget_mib, 3), rss <= budget_mib,
                              f"value: peak RSS / budget; {rss:.0f} MiB = {per_weight}x the FP32 weight bytes"))
    out = {"parameters": params, "fp32_weight_mib": round(weight_bytes / 2 ** 20, 1), "config": lm, "exports": rows}
    if "int8" in spec["lm_quants"]:
        out["latency"], out["quality"] = lm_speed(root, tokens, sizes)
    return out, goals


def lm_speed(root: Path, tokens: np.ndarray, sizes: Sizes) -> tuple[dict[str, Any], dict[str, Any]]:
    """The LM's fp32 and int8 bundles and ``quantize_static`` of the fp32 one (on the rows the pipeline calibrates
    on): 1 thread, batch 1, interleaved; SQNR and top-1 agreement of the logits against fp32 on other rows; the
    int8 export's own gate fidelity (held-out top-k set agreement)."""
    from benchmarks.cpu_int8 import quantize_static_peer
    from edgegate.data import load_data

    data = load_data(str(root / "moe_lm.data.npz"), ["tokens"], {"tokens": tokens.shape[1:]})
    calib = data.split("val").input()
    models = {q: (root / f"moe_lm-{q}.edgegate" / "model.onnx").read_bytes() for q in ("fp32", "int8")}
    models["ort_static"], _ = quantize_static_peer(str(root / "moe_lm-fp32.edgegate" / "model.onnx"), root,
                                                   "tokens", calib)
    sessions = {k: ort_session(v, THREADS) for k, v in models.items()}
    test = data.split("test").input()[:32]
    ref = sessions["fp32"].run(None, {"tokens": test})[0]
    quality = {}
    for k in ("int8", "ort_static"):
        got = sessions[k].run(None, {"tokens": test})[0]
        quality[k] = output_quality(got, ref)
    manifest = json.loads((root / "moe_lm-int8.edgegate" / "manifest.json").read_text())
    quality["int8"]["topk_set_agreement"] = (manifest["quant"].get("fidelity") or {}).get("summary", {}).get(
        "topk_set_agreement")
    feeds = [np.ascontiguousarray(test[i:i + 1]) for i in range(8)]
    t = time_interleaved({k: cycling(lambda x, s=s: s.run(None, {"tokens": x}), feeds) for k, s in sessions.items()},
                         sizes)
    return {"threads": THREADS, "batch": 1, "tokens_per_sample": int(tokens.shape[1]),
            **{f"{k}_ms": round(v.median_ms, 4) for k, v in t.items()},
            "int8_speedup_vs_fp32": ratio(t["fp32"], t["int8"]),
            "int8_speedup_vs_ort_static": ratio(t["ort_static"], t["int8"])}, quality


def run(ws: Workspace, sizes: Sizes) -> dict[str, Any]:
    spec = SMOKE if sizes.smoke else FULL
    out: dict[str, Any] = {"method": __doc__.split("\n\n", 1)[1].strip(), "errors": [], "goals": []}
    parts = {"decode": lambda: decode_part(ws, sizes, spec), "memory": lambda: memory_part(ws, sizes, spec)}
    for key, part in parts.items():
        try:
            out[key], goals = part()
            out["goals"] += goals
        except Exception as e:  # one part failing is a result, not a crash
            out["errors"].append({"model": key, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"})
    return out
