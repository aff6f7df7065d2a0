"""Target ``trt``, compile side: a TensorRT-ready ONNX graph -> issues, or a serialized engine.

Input: the ONNX model after the trt lowering (``export.passes.lower_trt``, ``cast_fp16`` for fp16).
`static_issues` applies TensorRT's explicit-quantization rules that its builder enforces late
(int32 behind DequantizeLinear, int8 constants that do not feed DequantizeLinear, asymmetric Q/DQ),
`parse_issues` runs the real ONNX parser and maps its errors back to node names and op types (the
outer ``edgegate`` node when the failure is inside a model-local function), and `build` runs the
builder: strongly typed network, an optimization profile for a dynamic batch, profiling verbosity
DETAILED (so the engine inspector can list layers), compute capabilities for TensorRT-RTX's
ahead-of-time build, and a timing cache where the flavor has one. Output: `Built` (engine bytes,
timing cache, the build record for the manifest, the parsed network's layers).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from edgegate.errors import TargetError, one_line
from edgegate.onnx_export.passes._graph import graphs
from edgegate.targets import trt_api as api
from edgegate.targets.base import CheckIssue

_COMPUTE = {"CONVOLUTION", "MATRIX_MULTIPLY", "QUANTIZE", "DEQUANTIZE", "CONDITION"}  # precision summary
_QUANTIZED = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4}
RTX_DEFAULT_CC = ("80", "86", "89", "120", "121")  # TensorRT-RTX's portable default (Turing needs 75 named)
_HINTS = {
    "NonZero": "TensorRT-RTX parses NonZero only through a plugin: export early exit with --batch 1 (If form), "
    "or build with -O flavor=tensorrt",
    "BitShift": "TernaryMatMul weights must be initializers so the trt lowering can unpack them",
    "BitwiseAnd": "TernaryMatMul weights must be initializers so the trt lowering can unpack them",
}
_DEFAULT_HINT = ("replace the op by standard ops TensorRT supports, or register a TensorRT plugin with the op's "
                 "name (TensorRT >= 10.7 uses it instead of the model-local function)")


@dataclasses.dataclass(frozen=True)
class Built:
    engine: bytes
    timing_cache: bytes | None
    record: dict[str, Any]
    layers: list[dict[str, Any]]


# --------------------------------------------------------------------------------------------- checks


def static_issues(model: onnx.ModelProto) -> list[CheckIssue]:
    """TensorRT explicit-quantization rules its builder enforces (found without TensorRT)."""
    issues = []
    for g in graphs(model.graph):
        inits = {t.name: t for t in g.initializer}
        for node in g.node:
            if node.op_type == "DequantizeLinear" and node.input[0] in inits \
                    and inits[node.input[0]].data_type == TensorProto.INT32:
                issues.append(CheckIssue(node.name, node.op_type,
                                         f"int32 tensor {node.input[0]} is dequantized; TensorRT rejects int32 "
                                         "behind DequantizeLinear (an int32 bias)",
                                         "store the bias as float, as edgegate's trt int8 lowering does "
                                         "(export with --target trt)"))
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 \
                    and node.input[2] in inits:
                zp = inits[node.input[2]]
                if zp.data_type == TensorProto.UINT8 or np.any(numpy_helper.to_array(zp) != 0):
                    issues.append(CheckIssue(node.name, node.op_type,
                                             f"zero point {node.input[2]} is {TensorProto.DataType.Name(zp.data_type)}"
                                             " or non-zero; TensorRT takes symmetric int8 Q/DQ (zero point 0) only",
                                             "quantize for this target (--target trt) instead of reusing a cpu "
                                             "(uint8, asymmetric) graph"))
            if node.op_type == "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
                continue  # a quantized constant may feed DequantizeLinear or a plugin
            for i, x in enumerate(node.input):
                if node.op_type == "QuantizeLinear" and i == 2:
                    continue  # the output type's zero point
                if x in inits and inits[x].data_type in _QUANTIZED:
                    kind = TensorProto.DataType.Name(inits[x].data_type).lower()
                    issues.append(CheckIssue(node.name, node.op_type,
                                             f"{kind} constant {x} feeds {node.op_type}; TensorRT takes a quantized "
                                             "constant only into DequantizeLinear (or a plugin)",
                                             "put a DequantizeLinear between the constant and its reader"))
    return issues


def parse_issues(data: bytes, flavor: str) -> list[CheckIssue]:
    """What TensorRT's ONNX parser refuses, mapped to node names and ops; [] when it parses."""
    trt = api.module(flavor)
    logger = api.make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if parser.parse(data):
        return []
    return _parser_errors(parser) or [CheckIssue("<graph>", "", f"TensorRT's ONNX parser failed: "
                                                 f"{(logger.errors or ['no message'])[-1]}", _DEFAULT_HINT)]


def _parser_errors(parser: Any) -> list[CheckIssue]:
    out, seen = [], set()
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        name, op, desc = e.node_name(), e.node_operator(), one_line(Exception(e.desc()), 200)
        stack = list(e.local_function_stack()) if e.local_function_stack_size() else []
        if stack:  # inside a model-local function: name the outer edgegate node, keep the inner op
            outer, _, outer_op = stack[0].rpartition(" (")
            where = f"{op or 'a node'} inside {outer_op.rstrip(')')} {outer}"
            name, op_type = outer, outer_op.rstrip(")")
            hint = _HINTS.get(op, _DEFAULT_HINT)
        else:
            where, op_type, hint = f"{op} node", op, _HINTS.get(op, _DEFAULT_HINT)
        key = (name, op_type, op)
        if key in seen:
            continue
        seen.add(key)
        out.append(CheckIssue(name or f"<node #{e.node()}>", op_type,
                              f"TensorRT cannot parse {where}: {desc or e.code()}", hint))
    return out


def _network_flags(trt: Any) -> int:
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(flag) if flag is not None else 0  # TensorRT >= 11: every network is strongly typed


# --------------------------------------------------------------------------------------------- build


def build(model: onnx.ModelProto, options: Any, flavor: str) -> Built:
    """Parse and build ``model`` with ``flavor``; TargetError quotes TensorRT's own message on failure."""
    trt = api.module(flavor)
    spec = api.FLAVORS[flavor]
    data = model.SerializeToString()
    logger = api.make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(data):
        issues = _parser_errors(parser)
        first = issues[0] if issues else CheckIssue("<graph>", "", (logger.errors or ["no message"])[-1])
        raise TargetError(f"TensorRT ({flavor}) cannot parse node {first.node} ({first.op_type}): {first.message}; "
                          f"{first.hint or _DEFAULT_HINT}")
    config = builder.create_builder_config()
    config.builder_optimization_level = options.opt_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if options.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    profiles = _profile(trt, builder, config, network, options)
    ccs = _compute_capabilities(trt, config, options, spec)
    cache = None
    if spec.timing_cache:
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    t0 = time.perf_counter()
    engine = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if engine is None:
        why = one_line(Exception("; ".join(logger.errors[-2:]) or "no message"))
        raise TargetError(f"TensorRT ({flavor} {api.version(trt)}) could not build the engine: {why}; "
                          "run `edgegate export --debug` for TensorRT's log")
    engine = bytes(engine)
    layers = network_layers(network)
    record = {
        "builder": "edgegate",
        "flavor": flavor,
        "module": spec.module,
        "trt_version": api.version(trt),
        "strongly_typed": True,
        "flags": {"builder_optimization_level": options.opt_level, "workspace_mib": options.workspace_mib,
                  "profiling_verbosity": "DETAILED", "fp16_graph": bool(options.fp16)},
        "profiles": profiles,
        "compute_capabilities": ccs,
        "plugins": _plugins(trt, model),
        "engine_bytes": len(engine),
        "build_s": round(seconds, 4),
        "layer_precisions": dict(Counter(f"{layer['type']}:{layer['outputs'][0]}" for layer in layers
                                         if layer["type"] in _COMPUTE and layer["outputs"])),
    }
    return Built(engine, bytes(cache.serialize()) if cache is not None else None, record, layers)


def _profile(trt: Any, builder: Any, config: Any, network: Any, options: Any) -> list[dict[str, Any]]:
    """One optimization profile over the batch dimension of every dynamic input; [] for static shapes."""
    profile, out = builder.create_optimization_profile(), []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = list(t.shape)
        if all(d >= 0 for d in dims):
            continue
        if any(d < 0 for d in dims[1:]):
            raise TargetError(f"input {t.name} has dynamic dims {dims} beyond the batch; export with fixed "
                              "per-sample shapes (the checkpoint's meta.inputs)")
        shapes = {k: [b, *dims[1:]] for k, b in (("min", options.min_batch), ("opt", options.opt_batch),
                                                  ("max", options.max_batch))}
        profile.set_shape(t.name, shapes["min"], shapes["opt"], shapes["max"])
        out.append({"input": t.name, **shapes})
    if out:
        config.add_optimization_profile(profile)
    return out


def _compute_capabilities(trt: Any, config: Any, options: Any, spec: api.Flavor) -> list[str]:
    if not spec.aot_compute_capabilities:
        if options.compute_capabilities:
            raise TargetError(f"trt flavor {spec.name} builds for the GPU it runs on; compute_capabilities is a "
                              "TensorRT-RTX option (use -O flavor=rtx)")
        found, why = api.gpus()
        if not found:
            raise TargetError(f"trt flavor {spec.name} needs an NVIDIA GPU to build ({why}); "
                              "use -O flavor=rtx to build ahead of time without one")
        return found[:1]
    if not options.compute_capabilities:
        return list(RTX_DEFAULT_CC)
    config.num_compute_capabilities = len(options.compute_capabilities)
    for i, cc in enumerate(options.compute_capabilities):
        value = getattr(trt.ComputeCapability, f"SM{cc}", None)
        if value is None:
            known = [n[2:] for n in dir(trt.ComputeCapability) if n.startswith("SM")]
            raise TargetError(f"compute capability {cc} is not one TensorRT-RTX builds for; use some of {known}")
        config.set_compute_capability(value, i)
    return list(options.compute_capabilities)


def _plugins(trt: Any, model: onnx.ModelProto) -> dict[str, str]:
    """For each edgegate op: 'plugin' when a TensorRT plugin of that name is registered, else 'inlined'."""
    try:
        names = {c.name for c in trt.get_plugin_registry().all_creators}
    except Exception:  # an older binding without all_creators: report the functions as inlined
        names = set()
    return {f.name: "plugin" if f.name in names else "inlined" for f in model.functions}


def network_layers(network: Any) -> list[dict[str, Any]]:
    """Name, layer type and output data types of every layer TensorRT parsed (before fusion)."""
    out = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = [str(layer.get_output(j).dtype).rpartition(".")[2] for j in range(layer.num_outputs)]
        out.append({"name": layer.name, "type": str(layer.type).rpartition(".")[2], "outputs": outputs})
    return out
