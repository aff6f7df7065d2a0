"""The small adapter over the two TensorRT Python packages the ``trt`` target drives.

``tensorrt`` (datacenter/Jetson, from NVIDIA's package index) and TensorRT for RTX
(``tensorrt-rtx-cu12-libs`` + ``tensorrt-rtx-cu12-bindings`` from PyPI, module
``tensorrt_rtx_bindings``) share one API; this module imports the one asked for lazily, routes its
log to ``logging`` (library code never writes to the terminal) and keeps the messages a failing call
leaves, so errors can quote them. It also answers whether an NVIDIA GPU is present, through the CUDA
driver library alone (no CUDA toolkit, no torch): building needs no GPU with TensorRT-RTX, running does.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib
import logging
from types import ModuleType
from typing import Any

from edgegate.errors import TargetError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Flavor:
    """One TensorRT package: how to import it and what to tell a user who lacks it."""

    name: str  # tensorrt | rtx
    module: str
    preload: str | None  # a package to import first (the RTX wheel ships its libraries separately)
    install: str
    timing_cache: bool  # TensorRT-RTX compiles kernels at run time: its build timing cache is a no-op
    aot_compute_capabilities: bool  # builds for named GPU generations without a GPU


FLAVORS: dict[str, Flavor] = {
    "rtx": Flavor("rtx", "tensorrt_rtx_bindings", "tensorrt_rtx_libs",
                  "pip install 'edgegate[trt]' (tensorrt-rtx-cu12-libs + tensorrt-rtx-cu12-bindings)",
                  timing_cache=False, aot_compute_capabilities=True),
    "tensorrt": Flavor("tensorrt", "tensorrt", None,
                       "pip install tensorrt --extra-index-url https://pypi.nvidia.com (NVIDIA's index; on Jetson "
                       "it comes with JetPack)", timing_cache=True, aot_compute_capabilities=False),
}
AUTO_ORDER = ("tensorrt", "rtx")  # a user who installed datacenter TensorRT from NVIDIA's index meant it


@functools.cache
def _import(flavor: str) -> ModuleType | str:
    """The flavor's module, or why it cannot be imported (cached: imports are slow and final)."""
    f = FLAVORS[flavor]
    try:
        if f.preload:
            importlib.import_module(f.preload)
        return importlib.import_module(f.module)
    except Exception as e:  # ImportError, or OSError from a missing shared library
        return f"{type(e).__name__}: {e}"


def module(flavor: str) -> ModuleType:
    """Import ``flavor``'s package or raise TargetError saying what to install."""
    got = _import(flavor)
    if isinstance(got, str):
        raise TargetError(f"trt flavor {flavor} needs the {FLAVORS[flavor].module} module ({got}); "
                          f"{FLAVORS[flavor].install}")
    return got


def installed(flavor: str) -> tuple[bool, str]:
    got = _import(flavor)
    return (False, got) if isinstance(got, str) else (True, version(got))


def resolve(flavor: str) -> str:
    """``auto`` -> the first installed flavor (tensorrt, then rtx); a named flavor is returned as is."""
    if flavor != "auto":
        if flavor not in FLAVORS:
            raise TargetError(f"trt flavor {flavor!r} is unknown; use auto, {', '.join(FLAVORS)}")
        return flavor
    for name in AUTO_ORDER:
        if installed(name)[0]:
            return name
    raise TargetError("no TensorRT package is installed; " + " or ".join(f.install for f in FLAVORS.values()))


def version(trt: ModuleType) -> str:
    return str(getattr(trt, "__version__", "unknown"))


# TensorRT's errors are kept and quoted in our one-line TargetError; its warnings are about things that
# are fine here (each inlined use of a model-local function repeats its node names). Both go to INFO,
# shown with --debug, so the terminal gets one line per problem.
_LOG_LEVELS = {0: logging.INFO, 1: logging.INFO, 2: logging.INFO, 3: logging.DEBUG, 4: logging.DEBUG}


@functools.cache
def _logger_class(trt: ModuleType) -> type:
    class CapturingLogger(trt.ILogger):
        """Forwards TensorRT's log to ``logging`` and keeps its error messages for our exceptions."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = _LOG_LEVELS.get(int(severity), logging.DEBUG)
            if int(severity) <= 1:  # INTERNAL_ERROR, ERROR
                self.errors.append(" ".join(str(msg).split()))
            log.log(level, "TensorRT: %s", msg)

    return CapturingLogger


def make_logger(trt: ModuleType) -> Any:
    """A fresh TensorRT ILogger of ``trt``'s flavor with an ``errors`` list."""
    return _logger_class(trt)()


# --------------------------------------------------------------------------------------- the GPU

# CUDA driver API attribute ids (cuda.h, CUdevice_attribute).
_CC_MAJOR, _CC_MINOR = 75, 76


@functools.cache
def cuda_driver() -> ctypes.CDLL | str:
    """The CUDA driver library, initialised; or why not (no driver = no NVIDIA GPU to run on)."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return "no NVIDIA driver (libcuda) on this machine"
    rc = lib.cuInit(0)
    if rc != 0:
        return f"the NVIDIA driver is present but cuInit failed (CUresult {rc}): no usable GPU"
    return lib


def gpus() -> tuple[list[str], str]:
    """Compute capabilities of the visible NVIDIA GPUs (e.g. ['89']) and a reason when there are none."""
    lib = cuda_driver()
    if isinstance(lib, str):
        return [], lib
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return [], "the NVIDIA driver sees no GPU"
    out = []
    for i in range(count.value):
        dev, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
        lib.cuDeviceGet(ctypes.byref(dev), i)
        lib.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, dev)
        lib.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, dev)
        out.append(f"{major.value}{minor.value}")
    return out, ""
