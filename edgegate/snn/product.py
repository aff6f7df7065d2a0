"""Exact synaptic input ``W @ s`` of binary spikes and int8 weights, for many rows (steps x samples) at once.

Stage: targets (snn), runtime side. Input: spikes bool [rows, n_in] and a group's weights int8
[n_out, n_in]. Output: int32 [rows, n_out]. Two ways, same integers:

* numpy float32 BLAS: every partial sum is an integer of magnitude <= 127 * fan_in < 2**24
  (`edgegate.snn.network.validate` refuses larger fan-ins), so float32 holds it exactly whatever the
  summation order;
* onnxruntime's ``MatMulInteger`` (uint8 spikes x int8 weights, int32 accumulation): 3x faster than
  float32 BLAS at 8192 x 1024 x 1024 (int8 dot-product instructions), 10x at the threshold_gate's
  8192 x 64 x 128 (no float conversion of the spikes); used from `ORT_MIN_MACS` on when onnxruntime
  imports. Its one-node model is written here as protobuf bytes: the runtime side does not import onnx.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

log = logging.getLogger(__name__)

ORT_MIN_MACS = 1 << 18  # rows x n_in x n_out from which onnxruntime's call overhead pays off
_UINT8, _INT8, _INT32 = 2, 3, 6  # onnx TensorProto.DataType


class IntegerProduct:
    """``W @ s`` for one group's weights, prepared once per simulation."""

    def __init__(self, weight: np.ndarray, use_ort: bool | None = None) -> None:
        self.weight = weight
        self.use_ort = use_ort  # None: by size, when onnxruntime is available
        self._wt32: np.ndarray | None = None
        self._wt8: np.ndarray | None = None

    def __call__(self, spikes: np.ndarray) -> np.ndarray:
        rows, (n_out, n_in) = spikes.shape[0], self.weight.shape
        use_ort = self.use_ort if self.use_ort is not None else rows * n_in * n_out >= ORT_MIN_MACS
        session = _ort_session() if use_ort else None
        if session is not None:
            if self._wt8 is None:
                self._wt8 = np.ascontiguousarray(self.weight.T)
            a = np.ascontiguousarray(spikes).view(np.uint8)
            return session.run(None, {"a": a, "b": self._wt8})[0]
        if self._wt32 is None:
            self._wt32 = self.weight.T.astype(np.float32)
        return (spikes.astype(np.float32) @ self._wt32).astype(np.int32)


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _int(field: int, v: int) -> bytes:
    return _varint(field << 3) + _varint(v)


def _msg(field: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _tensor(name: str, elem_type: int, dims: tuple[str, str]) -> bytes:
    """ValueInfoProto: name, TypeProto.tensor_type (elem_type, shape of symbolic dims)."""
    shape = b"".join(_msg(1, _msg(2, d)) for d in dims)
    return _msg(1, name) + _msg(2, _msg(1, _int(1, elem_type) + _msg(2, shape)))


def matmul_integer_model() -> bytes:
    """ModelProto bytes of ``y = MatMulInteger(a: uint8 [M, K], b: int8 [K, N])``, y int32 [M, N] (opset 13)."""
    node = _msg(1, "a") + _msg(1, "b") + _msg(2, "y") + _msg(3, "product") + _msg(4, "MatMulInteger")
    graph = (_msg(1, node) + _msg(2, "snn_product") + _msg(11, _tensor("a", _UINT8, ("M", "K")))
             + _msg(11, _tensor("b", _INT8, ("K", "N"))) + _msg(12, _tensor("y", _INT32, ("M", "N"))))
    return _int(1, 7) + _msg(2, "edgegate") + _msg(7, graph) + _msg(8, _msg(1, "") + _int(2, 13))


@functools.cache
def _ort_session():
    """One single-threaded onnxruntime session for every product, or None without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1  # like the emulator's BLAS: one thread
    so.log_severity_level = 3
    try:
        session = ort.InferenceSession(matmul_integer_model(), sess_options=so, providers=["CPUExecutionProvider"])
        # the kernels' extremes (all spikes, weights -128 and 127, a fan-in of 2**14) must come out exact
        a = np.ones((4, 1 << 14), np.uint8)
        a[1::2, ::3] = 0
        b = np.tile(np.array([[-128, 127, -1, 1]], np.int8), (1 << 14, 1))
        exact = np.array_equal(session.run(None, {"a": a, "b": b})[0], a.astype(np.int64) @ b.astype(np.int64))
    except Exception as e:  # an onnxruntime without the op: numpy's product is exact too
        log.debug("snn: onnxruntime MatMulInteger unavailable (%s); using numpy", e)
        return None
    if not exact:
        log.warning("snn: onnxruntime's MatMulInteger is not exact on this machine; the emulator uses numpy")
        return None
    return session
