"""Target ``trt``, run side: a checked engine -> a `Runner` on an NVIDIA GPU, and the engine inspector.

Input: engine bytes that `trt.check_engine` accepted and the flavor to load them with. Device memory
and the stream come from the CUDA driver API through ctypes (``libcuda``, present wherever the NVIDIA
driver is), on the device's primary context, which the TensorRT runtime shares: no CUDA toolkit,
cuda-python or torch is needed on the device. Latency is the wall time of one `run`: host-to-device
copies, ``execute_async_v3`` and device-to-host copies, synchronized (what an application waits for).
"""

from __future__ import annotations

import ctypes
import json
from typing import Any

import numpy as np

from edgegate.errors import TargetError
from edgegate.targets import trt_api as api
from edgegate.targets.base import BaseRunner, TensorSpec


class _Cuda:
    """The few CUDA driver calls the runner needs, each checked (CUresult 0 is success)."""

    def __init__(self, device: int = 0) -> None:
        lib = api.cuda_driver()
        if isinstance(lib, str):
            raise TargetError(f"the trt runner needs an NVIDIA GPU: {lib}")
        self.lib = lib
        self.device = ctypes.c_int(0)
        self._call("cuDeviceGet", ctypes.byref(self.device), device)
        self.context = ctypes.c_void_p()
        self._call("cuDevicePrimaryCtxRetain", ctypes.byref(self.context), self.device)
        self._call("cuCtxSetCurrent", self.context)
        self.stream = ctypes.c_void_p()
        self._call("cuStreamCreate", ctypes.byref(self.stream), 0)

    def _call(self, name: str, *args: Any) -> None:
        rc = getattr(self.lib, name)(*args)
        if rc != 0:
            raise TargetError(f"CUDA driver call {name} failed (CUresult {rc}); check the GPU and its driver")

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64(0)
        self._call("cuMemAlloc_v2", ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1)))
        return ptr.value

    def free(self, ptr: int) -> None:
        self.lib.cuMemFree_v2(ctypes.c_uint64(ptr))

    def to_device(self, ptr: int, a: np.ndarray) -> None:
        self._call("cuMemcpyHtoDAsync_v2", ctypes.c_uint64(ptr), a.ctypes.data_as(ctypes.c_void_p),
                   ctypes.c_size_t(a.nbytes), self.stream)

    def to_host(self, a: np.ndarray, ptr: int) -> None:
        self._call("cuMemcpyDtoHAsync_v2", a.ctypes.data_as(ctypes.c_void_p), ctypes.c_uint64(ptr),
                   ctypes.c_size_t(a.nbytes), self.stream)

    def sync(self) -> None:
        self._call("cuStreamSynchronize", self.stream)

    def close(self) -> None:
        self.lib.cuStreamDestroy_v2(self.stream)
        self.lib.cuDevicePrimaryCtxRelease_v2(self.device)


def _deserialize(engine: bytes, flavor: str) -> tuple[Any, Any, Any]:
    trt = api.module(flavor)
    logger = api.make_logger(trt)
    runtime = trt.Runtime(logger)
    cuda_engine = runtime.deserialize_cuda_engine(engine)
    if cuda_engine is None:
        raise TargetError(f"TensorRT ({flavor} {api.version(trt)}) could not load the engine: "
                          f"{(logger.errors or ['no message'])[-1]}")
    return trt, runtime, cuda_engine


def inspect_engine(engine: bytes, flavor: str) -> list[dict[str, Any]]:
    """Layers of a built engine (fused, with tactics and tensor formats) from TensorRT's engine inspector."""
    cuda = _Cuda()
    try:
        trt, _runtime, cuda_engine = _deserialize(engine, flavor)
        info = cuda_engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        layers = json.loads(info).get("Layers", [])
        return [layer if isinstance(layer, dict) else {"name": str(layer)} for layer in layers]
    finally:
        cuda.close()


class TrtRunner(BaseRunner):
    """Runs one TensorRT engine on the GPU; `latencies_ms` gets the wall time of each `run` call."""

    target, what = "trt", "engine"

    def __init__(self, engine: bytes, flavor: str, options: Any, where: str) -> None:
        super().__init__()
        self.options = options
        self._cuda = _Cuda()
        try:
            self._trt, self._runtime, self._engine = _deserialize(engine, flavor)
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise TargetError(f"TensorRT could not create an execution context for {where} (GPU memory?)")
        except BaseException:
            self._cuda.close()
            raise
        trt = self._trt
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.input_specs = tuple(
            TensorSpec(n, tuple(d if d >= 0 else None for d in self._engine.get_tensor_shape(n)),
                       np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))))
            for n in inputs)
        self.output_names = tuple(n for n in names if n not in inputs)
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def close(self) -> None:
        super().close()
        if self._cuda is None:
            return
        for ptr, _ in self._buffers.values():
            self._cuda.free(ptr)
        self._buffers.clear()
        self._context = self._engine = self._runtime = None
        self._cuda.close()
        self._cuda = None

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, -1))
        if size < nbytes:
            if ptr:
                self._cuda.free(ptr)
            ptr = self._cuda.alloc(nbytes)
            self._buffers[name] = (ptr, nbytes)
            self._context.set_tensor_address(name, ptr)
        return ptr

    def run_impl(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for spec in self.input_specs:
            a = arrays[spec.name]
            if not self._context.set_input_shape(spec.name, a.shape):
                raise TargetError(f"input {spec.name} shape {a.shape} is outside the engine's optimization profile "
                                  f"(batch {self.options.min_batch}..{self.options.max_batch}); re-export with "
                                  "-O max_batch=N")
        outputs = {}
        for name in self.output_names:
            shape = tuple(self._context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise TargetError(f"output {name} has a data-dependent shape {shape}; the trt runner needs output "
                                  "shapes known from the input shapes")
            outputs[name] = np.empty(shape, np.dtype(self._trt.nptype(self._engine.get_tensor_dtype(name))))
        with self.timed():
            for name, a in arrays.items():
                self._cuda.to_device(self._buffer(name, a.nbytes), a)
            for name, out in outputs.items():
                self._buffer(name, out.nbytes)
            if not self._context.execute_async_v3(self._cuda.stream.value or 0):
                raise TargetError("TensorRT failed to run the engine; run with --debug for TensorRT's log")
            for name, out in outputs.items():
                self._cuda.to_host(out, self._buffers[name][0])
            self._cuda.sync()
        return outputs
