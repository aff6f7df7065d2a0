"""ONNX Runtime helpers shared by the pass tests: a single-thread session and the optimized graph's ops."""

from __future__ import annotations

import collections
import os
import tempfile

import onnx
import onnxruntime as ort

from edgegate.onnx_export.passes import iter_nodes


def session(proto: onnx.ModelProto, optimized_path: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def optimized_op_types(proto: onnx.ModelProto) -> collections.Counter:
    """Op types of ORT's optimized graph (level all), subgraphs included."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "optimized.onnx")
        session(proto, path)
        return collections.Counter(n.op_type for n in iter_nodes(onnx.load(path).graph))
