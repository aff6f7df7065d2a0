"""Section 3, ternary: one 4096 x 4096 BitNet linear, bytes on disk and latency vs FP32 MatMul.

The layer (``benchmarks.models.TernaryProjection``: absmean ternary weights, per-token 8-bit absmax
activations) is exported with ``edgegate export --quant ternary``: the ONNX file keeps the weights
2-bit packed and the ``cpu`` lowering turns ``TernaryMatMul`` into ONNX Runtime's stock
``MatMulInteger`` (uint8 activations x int8 codes, the unpack constant-folded at session creation).
Peers, same dense weight ``codes * scale`` in float32, timed interleaved with the bundle:

* ``ort_fp32``: ONNX Runtime running one float ``MatMul`` (the weight an initializer),
* ``torch_fp32``: ``torch.nn.functional.linear`` (``torch.inference_mode``), same thread count.

Bytes: the bundle's ``model.onnx`` (graph, packed weight, scale, decode tables) as bits per weight,
against the float ONNX file. Correctness: the bundle's output against the numpy reference of
``TernaryMatMul`` on the same per-token quantized input, in output quantization steps
(scale / per-token activation multiplier).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.harness import Sizes, goal, ort_session, ratio, time_interleaved
from benchmarks.workspace import CLASSES, TERNARY, Workspace

THREADS = (1, 2)
BATCHES = (1, 8)
SPEEDUP_GOAL = 2.0


def _float_matmul_onnx(w_kn: np.ndarray) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    k, n = w_kn.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "fp32_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(w_kn, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]).SerializeToString()


def run(ws: Workspace, sizes: Sizes) -> dict[str, Any]:
    import torch

    from edgegate.loading import load
    from edgegate.nn.ternary import quantize_activations
    from edgegate.ops import reference, unpack_ternary

    export = ws.export(TERNARY, "ternary")
    module = load(ws.checkpoint(TERNARY), model_class=CLASSES[TERNARY]).module.eval()
    layer = module.proj
    packed, scale = (t.numpy() for t in layer.ternary_weights())
    n, k = layer.out_features, layer.in_features
    w = (unpack_ternary(packed, k).astype(np.float32) * scale).astype(np.float32)  # [N, K]
    bundle_bytes = (export.path / "model.onnx").read_bytes()
    fp32_bytes = _float_matmul_onnx(np.ascontiguousarray(w.T))
    disk = {"weights": n * k, "bundle_model_onnx_bytes": len(bundle_bytes),
            "bits_per_weight": round(8 * len(bundle_bytes) / (n * k), 4),
            "packed_weight_bytes": int(packed.nbytes), "fp32_onnx_bytes": len(fp32_bytes),
            "fp32_bits_per_weight": round(8 * len(fp32_bytes) / (n * k), 4),
            "size_ratio_fp32_over_bundle": round(len(fp32_bytes) / len(bundle_bytes), 2)}

    rng = np.random.default_rng(1)
    x_check = rng.standard_normal((8, k)).astype(np.float32)
    xq = quantize_activations(torch.from_numpy(x_check)).numpy()
    want = reference("TernaryMatMul", xq, packed, scale, in_features=k)
    got = ort_session(bundle_bytes, 1).run(None, {"x": x_check})[0]
    step = scale * np.abs(x_check).max(-1, keepdims=True) / 127.0  # the accumulator's LSB per token
    correctness = {"max_abs_err": float(np.abs(got - want).max()),
                   "max_err_output_steps": round(float((np.abs(got - want) / step).max()), 4)}

    w_torch = torch.from_numpy(w)
    rows, goals = [], []
    old_threads = torch.get_num_threads()
    try:
        for threads in THREADS:
            torch.set_num_threads(threads)
            ours, peer = ort_session(bundle_bytes, threads), ort_session(fp32_bytes, threads)
            for batch in BATCHES:
                x = rng.standard_normal((batch, k)).astype(np.float32)
                xt = torch.from_numpy(x)

                def torch_linear(xt=xt):
                    with torch.inference_mode():
                        return torch.nn.functional.linear(xt, w_torch)

                t = time_interleaved({"edgegate": lambda x=x, s=ours: s.run(None, {"x": x}),
                                      "ort_fp32": lambda x=x, s=peer: s.run(None, {"x": x}),
                                      "torch_fp32": torch_linear}, sizes)
                row = {"threads": threads, "batch": batch, **{f"{a}_ms": round(v.median_ms, 4) for a, v in t.items()},
                       "speedup_vs_ort_fp32": ratio(t["ort_fp32"], t["edgegate"]),
                       "speedup_vs_torch_fp32": ratio(t["torch_fp32"], t["edgegate"]),
                       "int8_weight_gb_per_s": round(n * k / 1e9 / (t["edgegate"].median_ms / 1e3), 2),
                       "timings": {a: v.to_dict() for a, v in t.items()}}
                rows.append(row)
                slow = min(row["speedup_vs_ort_fp32"], row["speedup_vs_torch_fp32"])
                goals.append(goal(f"ternary {n}x{k}, {threads} thread(s), batch {batch}: >= {SPEEDUP_GOAL}x FP32",
                                  f">= {SPEEDUP_GOAL} vs ORT and torch", slow, slow >= SPEEDUP_GOAL,
                                  f"vs ORT {row['speedup_vs_ort_fp32']}x, vs torch {row['speedup_vs_torch_fp32']}x"))
    finally:
        torch.set_num_threads(old_threads)
    return {"method": __doc__.split("\n\n", 1)[1].strip(), "shape": [n, k], "disk": disk, "correctness": correctness,
            "kernel": "stock ONNX Runtime MatMulInteger (no native kernel needed: see goals)",
            "rows": rows, "goals": goals}
