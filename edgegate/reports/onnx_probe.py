"""Look inside a bundle's ``model.onnx`` for compare: exit thresholds to sweep, layer outputs to measure.

Input: an ``onnx.ModelProto`` (the deployed graph, QDQ and ``edgegate`` functions included). Output:
patched copies run by ONNX Runtime on the CPU: one whose ``ExitDecision`` / ``LearnedExitDecision``
threshold initializers hold other values (`with_thresholds`: the exit-threshold sweep, and exits
disabled for per-layer error), and one whose layer outputs are extra graph outputs (`run_layers`).

Layers are found by their weights: the Gemm / MatMul / Conv nodes (or their integer forms) of the main
graph whose weight input traces back (through DequantizeLinear, Transpose, Cast, Reshape) to an
initializer named ``<module path>.weight...`` are that torch module; its output is one of the tensors
computed from them by their elementwise epilogue (bias, scales, zero-point terms; `layer_outputs`).
Layers inside ``If`` branches (the batch-1 early-exit form) are not graph-level tensors and are not
measured.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from edgegate.errors import EdgegateError
from edgegate.onnx_export.passes._graph import copied, value_producers, value_readers

EXIT_OPS = frozenset({"ExitDecision", "LearnedExitDecision"})
LAYER_OPS = frozenset({"Gemm", "MatMul", "Conv", "MatMulInteger", "ConvInteger", "TernaryMatMul"})
_PASS_THROUGH = frozenset({"DequantizeLinear", "Transpose", "Cast", "Reshape", "Identity", "Unsqueeze"})
_AFFINE = frozenset({"Add", "Sub", "Mul", "Div", "Cast"})
_WEIGHT_NAME = re.compile(r"^(?P<path>.+?)\.(?:weight|packed_weight|w_packed|packed)(?:[._].*)?$")
NEVER_EXIT = 2.0  # above any probability: with it every sample runs every stage


class ProbeError(EdgegateError):
    """The bundle's ONNX graph has no exit thresholds to change, or cannot be run with extra outputs."""


def _graphs(graph: onnx.GraphProto) -> Iterable[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for a in node.attribute:
            for g in [*a.graphs, *([a.g] if a.HasField("g") else [])]:
                yield from _graphs(g)


def exit_threshold_names(model: onnx.ModelProto) -> list[str]:
    """The tensors feeding each exit decision's ``threshold`` input, in graph order (subgraphs too)."""
    names: list[str] = []
    for g in _graphs(model.graph):
        for node in g.node:
            if node.domain == "edgegate" and node.op_type in EXIT_OPS and node.input[1] not in names:
                names.append(node.input[1])
    return names


def with_thresholds(model: onnx.ModelProto, value: float) -> onnx.ModelProto:
    """A copy of `model` whose every exit threshold is `value` (a sweep point, or `NEVER_EXIT`)."""
    names = set(exit_threshold_names(model))
    if not names:
        raise ProbeError("model.onnx has no edgegate ExitDecision node; there are no exit thresholds to sweep")
    out = copied(model)
    found: set[str] = set()
    for g in _graphs(out.graph):
        for init in g.initializer:
            if init.name in names:
                dtype = numpy_helper.to_array(init).dtype
                init.CopyFrom(numpy_helper.from_array(np.full(tuple(init.dims), value, dtype=dtype), init.name))
                found.add(init.name)
        for node in g.node:
            if node.op_type == "Constant" and node.output[0] in names:
                for a in node.attribute:
                    if a.name == "value":
                        dtype = numpy_helper.to_array(a.t).dtype
                        a.t.CopyFrom(numpy_helper.from_array(np.full(tuple(a.t.dims), value, dtype=dtype)))
                        found.add(node.output[0])
    missing = sorted(names - found)
    if missing:
        raise ProbeError(f"exit threshold {missing[0]} of model.onnx is computed, not a constant; "
                         "re-export the bundle with this edgegate to sweep it")
    return out


def layer_outputs(model: onnx.ModelProto) -> dict[str, list[str]]:
    """``{torch module path: candidate main-graph tensors}`` for the layers found by their weight names.

    Lowering passes may split a layer into several integer ops and an epilogue (zero-point terms,
    output scale, bias), so the layer's output is not one fixed op's output: the candidates are every
    tensor reached from *all* of the nodes that read the weight through elementwise affine ops only
    (Add, Sub, Mul, Div, Cast). The caller picks the one that matches the float module's output.
    """
    g = model.graph
    producer = value_producers(g)
    consumers = value_readers(g)
    constants = {i.name for i in g.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        if node.op_type not in LAYER_OPS or len(node.input) < 2:
            continue
        w = node.input[1]
        while w in producer and producer[w].op_type in _PASS_THROUGH:
            w = producer[w].input[0]
        m = _WEIGHT_NAME.match(w) if w in constants else None
        if m is not None:
            readers.setdefault(m["path"], []).append(node)
    found: dict[str, list[str]] = {}
    for path, nodes in readers.items():
        reached = [_affine_closure(n.output[0], consumers) for n in nodes]
        order = [t for t in reached[0] if all(t in r for r in reached[1:])]
        if order:
            found[path] = order
    return found


def _affine_closure(start: str, consumers: Mapping[str, list[onnx.NodeProto]], limit: int = 16) -> list[str]:
    """`start` and the tensors computed from it by chains of elementwise affine ops, breadth first."""
    seen, queue = [start], [start]
    while queue and len(seen) < limit:
        t = queue.pop(0)
        for node in consumers.get(t, []):
            if node.op_type in _AFFINE and node.output[0] not in seen:
                seen.append(node.output[0])
                queue.append(node.output[0])
    return seen


def run_layers(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], tensors: Sequence[str],
               batch: int | None) -> dict[str, np.ndarray]:
    """Run `model` on ORT CPU with `tensors` added as graph outputs; rows concatenated over batches."""
    out = copied(model)
    have = {o.name for o in out.graph.output}
    out.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in have)
    names = [o.name for o in out.graph.output]
    got = run_onnx(out, feeds, batch)
    return {n: got[n] for n in names if n in tensors or n in have}


def run_onnx(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], batch: int | None) -> dict[str, np.ndarray]:
    """All outputs of `model` on ORT CPU over the rows of `feeds`, `batch` rows per call (None: all)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types
        raise ProbeError(f"onnxruntime cannot load the probed model.onnx: {' '.join(str(e).split())[:200]}") from e
    names = [o.name for o in session.get_outputs()]
    n = len(next(iter(feeds.values())))
    step = batch or n
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for i in range(0, n, step):
        part = {k: _pad(v[i:i + step], step) for k, v in feeds.items()}
        rows = min(step, n - i)
        for k, v in zip(names, session.run(names, part), strict=True):
            chunks[k].append(v[:rows] if np.ndim(v) and len(v) == step else v)
    return {k: np.concatenate(v) if np.ndim(v[0]) else v[-1] for k, v in chunks.items()}


def _pad(a: np.ndarray, rows: int) -> np.ndarray:
    """A static-batch model takes whole batches: repeat the last row to fill the final one."""
    return a if len(a) == rows else np.concatenate([a, np.repeat(a[-1:], rows - len(a), axis=0)])



