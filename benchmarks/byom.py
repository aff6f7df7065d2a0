"""Bring-your-own-model figures: tiny transformers models through conversion, int8 calibration and export.

    python -m benchmarks.byom                  # every architecture, plus the Qwen3-Next delta-net ratio
    python -m benchmarks.byom --only mixtral   # one architecture; --no-peer skips the slow peer export

Per architecture of ``edgegate.zoo.hf`` (trained first; training is reported apart): the gates found
after conversion, the ``edgegate`` ops of the exported graph, the converted model's largest error vs
transformers in torch and ONNX Runtime's fp32 error vs transformers, the int8 gate-aware top-k set and
top-1 expert agreement on held-out tokens, and the wall seconds of conversion + calibration + export +
QDQ lowering (what ``edgegate export --quant int8`` spends on the model). The peer, measured in the same
run: exporting Qwen3-Next with transformers' own delta-net layers instead of edgegate's export form.
The packed BitNet (``bitnet``) is exported fp32: its errors vs transformers and the bits per weight.
Reported, never asserted; one thread (``torch.set_num_threads(1)``), as the zoo trains.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections import Counter
from typing import Any

import numpy as np
import torch

from edgegate.convert import convert, verify
from edgegate.data import TensorSpec
from edgegate.gates import find_gates
from edgegate.onnx_export.torch_export import export_onnx
from edgegate.quantization.plan import QdqForm
from edgegate.quantization.step import QuantOptions, quantize_for_export
from edgegate.zoo import hf

ROWS = 256  # calibration and held-out windows of 8 tokens


def _rows(data, n: int):
    return data.subset(np.arange(0, len(data), max(1, len(data) // n))[:n])


def measure(arch: str) -> dict[str, Any]:
    import onnxruntime as ort

    t0 = time.perf_counter()
    original = hf.trained(arch)
    train_s = time.perf_counter() - t0
    _, calib, held = hf.markov()
    calib, held = _rows(calib, ROWS), _rows(held, ROWS)
    model = copy.deepcopy(original)
    t0 = time.perf_counter()
    conversion = verify(original, convert(model), {"input_ids": calib.input()[:64]}, atol=1e-4)
    gate_map = find_gates(model)
    quantized = quantize_for_export(model, gate_map, QuantOptions("int8"), QdqForm.ASYMMETRIC, calib, held,
                                    TensorSpec("input_ids", (hf.CONTEXT,), "int64"))
    graph = export_onnx(quantized.export_model, torch.from_numpy(calib.input()[:2]), "input_ids")
    quantized.lower(graph)
    export_s = time.perf_counter() - t0
    x = held.input()[:128]
    got = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {
        "input_ids": x})[0]
    with torch.no_grad():
        want = original(torch.from_numpy(x)).numpy()
    summary = quantized.record["fidelity"]["summary"]
    return {"architecture": arch, "params": hf.n_params(original),
            "gates": dict(Counter(str(g.kind) for g in gate_map)),
            "ops": dict(Counter(n.op_type for n in graph.graph.node if n.domain == "edgegate")),
            "nodes": len(graph.graph.node), "torch_err": conversion.checks["max_abs_err"],
            "fp32_ort_err": float(np.abs(got - want).max()), "topk_set_agreement": summary["topk_set_agreement"],
            "top1_expert_agreement": summary["top1_expert_agreement"], "export_s": round(export_s, 2),
            "train_s": round(train_s, 2)}


def measure_bitnet() -> dict[str, Any]:
    """The packed BitNet: converted with its own codes, exported fp32 (TernaryMatMul, 2 bits a weight)."""
    import onnxruntime as ort

    original = hf.LMLogits(hf.packed_bitnet()).eval()
    model = copy.deepcopy(original)
    x = hf.markov()[2].input()[:128]
    t0 = time.perf_counter()
    conversion = verify(original, convert(model), {"input_ids": x[:64]}, atol=1e-4)
    graph = export_onnx(model, torch.from_numpy(x[:2]), "input_ids")
    export_s = time.perf_counter() - t0
    got = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {
        "input_ids": x})[0]
    with torch.no_grad():
        want = original(torch.from_numpy(x)).numpy()
    packed = sum(len(t.raw_data) for t in graph.graph.initializer if t.data_type == 2)  # uint8
    weights = sum(m.in_features * m.out_features for m in model.modules() if type(m).__name__ == "TernaryLinear")
    return {"architecture": "bitnet", "params": hf.n_params(original), "ternary_weights": weights,
            "gates": dict(Counter(str(g.kind) for g in find_gates(model))),
            "ops": dict(Counter(n.op_type for n in graph.graph.node if n.domain == "edgegate")),
            "nodes": len(graph.graph.node), "module_err": max(conversion.checks["modules"].values()),
            "torch_err": conversion.checks["max_abs_err"], "fp32_ort_err": float(np.abs(got - want).max()),
            "fp32_ort_within_1e-4": float(np.mean(np.abs(got - want) <= 1e-4)),
            "top1_token_agreement": float(np.mean(got.argmax(-1) == want.argmax(-1))),
            "bits_per_ternary_weight": 8 * packed / weights, "export_s": round(export_s, 2)}


def peer_delta_net() -> dict[str, Any]:
    """Qwen3-Next export with transformers' delta-net layers (the peer) vs edgegate's export form."""
    from edgegate.convert import converters

    out = {}
    for form in ("export_form", "transformers"):
        model = hf.build("qwen3_next").eval()
        if form == "transformers":  # convert everything but the delta-net layers
            skip = {p for p, i in converters().items() if p.endswith(":Qwen3NextGatedDeltaNet")}
            keep = [(n, m) for n, m in model.named_modules() if f"{type(m).__module__}:{type(m).__qualname__}" in skip]
            convert(model)
            for name, module in keep:
                parent, _, leaf = name.rpartition(".")
                model.get_submodule(parent).register_module(leaf, module)
        else:
            convert(model)
        t0 = time.perf_counter()
        graph = export_onnx(model, torch.zeros(2, hf.CONTEXT, dtype=torch.int64), "input_ids")
        out[form] = {"export_s": round(time.perf_counter() - t0, 2), "nodes": len(graph.graph.node)}
    out["ratio"] = round(out["transformers"]["export_s"] / out["export_form"]["export_s"], 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.byom", description=__doc__.split("\n\n")[0])
    names = (*hf.ARCHS, "bitnet")
    parser.add_argument("--only", default=",".join(names), help=f"comma-separated of {', '.join(names)}")
    parser.add_argument("--no-peer", action="store_true", help="skip the Qwen3-Next peer export (minutes)")
    args = parser.parse_args(argv)
    archs = [a for a in args.only.split(",") if a]
    unknown = [a for a in archs if a not in names]
    if unknown:
        parser.error(f"unknown architecture {', '.join(unknown)}; choose from {', '.join(names)}")
    torch.set_num_threads(1)
    for arch in archs:  # one JSON object per line, as each finishes
        sys.stdout.write(json.dumps(measure_bitnet() if arch == "bitnet" else measure(arch)) + "\n")
        sys.stdout.flush()
    if not args.no_peer:
        sys.stdout.write(json.dumps({"qwen3_next_delta_net": peer_delta_net()}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
