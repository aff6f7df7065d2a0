"""Accuracy and gate agreement of a quantized ONNX model against the float one, on held-out data.

The gate decisions are read from the graphs themselves. Each ``edgegate`` gating node of the float
model reads and writes named tensors; for each gate we expose, as an extra output of each model,
the tensor that carries its decision, found by name:

* ``TopKGate``: the expert indices (output 1): top-1 and top-k set agreement per token,
* ``ChannelGate``: the mask logits (input 1); the mask is ``logit > 0`` (sigmoid > 0.5),
* ``ThresholdGate``: the gated activation h (input 0); the mask is ``h > tau`` (the float model's tau),
* ``SigmoidGate``: the gate logits (input 1): a soft gate, reported as mean |sigmoid difference|,
* early exit: the model's ``exit_index`` output (the per-stage ``ExitDecision`` tensors are compacted).

An input-side tensor is taken as the gate *reads* it in that model: ONNX Runtime's quantizer
rewires the consumers of a quantized tensor ``T`` to ``T_DequantizeLinear_Output``, so that name is
preferred when present. Names survive edgegate's QDQ pass and ``quantize_static``; ORT's
pre-processing inlines the gating functions and renames their internal and output tensors, so a
gate whose output-side tensor is not also a graph output is reported as missing for that model.
Timing never uses these augmented graphs (extra outputs can block fusions).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgegate.metrics import decision_agreement, mask_hamming, top1_agreement, top1_expert_agreement, topk_set_agreement

# op type -> (where the decision tensor is: ("out"|"in", index), ONNX element type, kind)
_DECISIONS = {
    "TopKGate": (("out", 1), 7, "route"),
    "ChannelGate": (("in", 1), 1, "mask_logits"),
    "ThresholdGate": (("in", 0), 1, "threshold"),
    "SigmoidGate": (("in", 1), 1, "soft"),
}


def gate_tensors(reference_bytes: bytes) -> list[tuple[str, str, str, int]]:
    """[(label, kind, tensor name, ONNX element type)] of each gate decision in the float model."""
    import onnx

    found, count = [], {}
    for node in onnx.load_from_string(reference_bytes).graph.node:
        if node.domain != "edgegate" or node.op_type not in _DECISIONS:
            continue
        (side, idx), elem, kind = _DECISIONS[node.op_type]
        tensor = (node.output if side == "out" else node.input)[idx]
        found.append((f"{node.op_type}#{count.get(node.op_type, 0)}", kind, tensor, elem))
        count[node.op_type] = count.get(node.op_type, 0) + 1
    return found


def thresholds(reference_bytes: bytes) -> dict[str, np.ndarray]:
    """label -> tau of each ``ThresholdGate`` of the float model (its input 1, an initializer)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(reference_bytes)
    inits = {t.name: t for t in model.graph.initializer}
    gates = [n for n in model.graph.node if n.domain == "edgegate" and n.op_type == "ThresholdGate"]
    return {f"ThresholdGate#{i}": numpy_helper.to_array(inits[n.input[1]]) for i, n in enumerate(gates)
            if n.input[1] in inits}


def expose(model_bytes: bytes, tensors: list[tuple[str, str, str, int]]) -> tuple[bytes, dict[str, str]]:
    """The model with each named gate tensor that it computes as an extra output; {tensor: label} exposed.

    Input-side tensors prefer ``<name>_DequantizeLinear_Output``: what the gate reads after ORT's quantizer.
    """
    import onnx
    from onnx import helper

    model = onnx.load_from_string(model_bytes)
    produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    exposed = {}
    for label, kind, name, elem in tensors:
        read = [f"{name}_DequantizeLinear_Output", name] if kind != "route" else [name]
        tensor = next((t for t in read if t in produced), None)
        if tensor is None:
            continue
        if tensor not in outputs:
            model.graph.output.append(helper.make_tensor_value_info(tensor, elem, None))
            outputs.add(tensor)
        exposed[tensor] = label
    return model.SerializeToString(), exposed


def run_all(session: Any, input_name: str, x: np.ndarray, batch: int = 256) -> list[np.ndarray]:
    """Every output of ``session`` on all rows of ``x``, in batches, concatenated along rows."""
    outs: list[list[np.ndarray]] = []
    for i in range(0, len(x), batch):
        for j, y in enumerate(session.run(None, {input_name: x[i:i + batch]})):
            if j == len(outs):
                outs.append([])
            outs[j].append(y)
    return [np.concatenate(o) for o in outs]


def evaluate(model_bytes: bytes, reference_bytes: bytes, input_name: str, x: np.ndarray) -> dict[str, Any]:
    """Run the gate-exposed model on ``x``: {"logits", "exit_index"?, "gates": {label: (kind, array)}}."""
    from benchmarks.harness import ort_session

    tensors = gate_tensors(reference_bytes)
    kinds = {label: kind for label, kind, _, _ in tensors}
    augmented, exposed = expose(model_bytes, tensors)
    session = ort_session(augmented, 1)
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, run_all(session, input_name, x), strict=True))
    taus = thresholds(reference_bytes)
    result: dict[str, Any] = {"logits": values[names[0]], "taus": taus,
                              "gates": {label: (kinds[label], values[t]) for t, label in exposed.items()}}
    if "exit_index" in values:
        result["exit_index"] = values["exit_index"]
    return result


def compare(ref: dict[str, Any], got: dict[str, Any], labels: np.ndarray | None) -> dict[str, Any]:
    """Accuracy of ``got`` and its agreement with ``ref`` (the float model) on the same rows."""
    out: dict[str, Any] = {}
    pred = got["logits"].argmax(-1)
    if labels is not None:
        out["accuracy"] = round(float(np.mean(pred == labels)), 4)
    out["top1_agreement"] = round(top1_agreement(ref["logits"], got["logits"]), 4)
    if "exit_index" in ref and "exit_index" in got:
        out["exit_agreement"] = round(decision_agreement(ref["exit_index"], got["exit_index"]), 4)
    gates: dict[str, float] = {}
    for label, (kind, a) in ref["gates"].items():
        if label not in got["gates"]:
            continue
        b = got["gates"][label][1]
        if kind == "route":
            gates[f"{label}.top1"] = top1_expert_agreement(a, b)
            gates[f"{label}.topk_set"] = topk_set_agreement(a, b)
        elif kind == "mask_logits":
            gates[f"{label}.mask"] = 1 - mask_hamming(a > 0, b > 0)
        elif kind == "threshold":
            if label not in ref["taus"]:
                continue
            tau = ref["taus"][label]
            gates[f"{label}.mask"] = 1 - mask_hamming(a > tau, b > tau)
        else:
            gates[f"{label}.soft_mae"] = float(np.mean(np.abs(_sigmoid(a) - _sigmoid(b))))
    out["gates"] = {k: round(v, 4) for k, v in gates.items()}
    binary = [v for k, v in gates.items() if not k.endswith("soft_mae")]
    if "exit_agreement" in out:
        binary.append(out["exit_agreement"])
    out["gate_agreement"] = round(float(np.mean(binary)), 4) if binary else None
    return out


def _sigmoid(a: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-a.astype(np.float64)))
