"""Stage 6, target ``cpu``: an ONNX model -> a bundle that ONNX Runtime runs on the host CPU.

compile: ``onnx.ModelProto`` (with its ``edgegate`` model-local functions) -> `Artifact` holding
``model.onnx`` (one file, no external data), after the ONNX checker (full_check) and a trial
onnxruntime session. A quantized (QDQ) graph first goes through the latency-aware pass
(``edgegate.targets.cpu_latency``, ``-O latency_aware=false`` to skip it): regions that ONNX Runtime runs
slower in INT8 than in float on this CPU are turned back to float, each decision and its measured times
recorded in the artifact options (the manifest's ``target_options.latency_aware_decisions``).
load: a bundle dir, `Bundle` or `Artifact` -> `CpuRunner`.
Only `compile`/`check` need onnx; `load` and `CpuRunner` need numpy + onnxruntime alone.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgegate.errors import TargetError
from edgegate.fs import scratch_write
from edgegate.heap import release_freed_heap
from edgegate.targets.base import Artifact, BaseRunner, CheckIssue, TargetBase, TensorSpec

if TYPE_CHECKING:
    import onnx

    from edgegate.bundle import Bundle

MODEL_FILE = "model.onnx"
# Option value -> name in onnxruntime.GraphOptimizationLevel (looked up lazily: ORT imports late).
GRAPH_OPTIMIZATION = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16,
    "tensor(int32)": np.int32,
    "tensor(uint32)": np.uint32,
    "tensor(int64)": np.int64,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


_DECISIONS = "latency_aware_decisions"  # written by compile into the artifact options, read by nobody at run time
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclasses.dataclass(frozen=True)
class CpuOptions:
    """Session options, recorded in the manifest as ``target_options`` (``timing_inputs`` is not)."""

    intra_op_threads: int = 0  # 0 lets onnxruntime pick (one per physical core)
    graph_optimization: str = "all"  # disable | basic | extended | all
    latency_aware: bool = True  # measure INT8 regions against float at compile time; keep the faster
    # representative inputs by graph input name (every input) for the latency-aware trials
    timing_inputs: Mapping[str, np.ndarray] | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        t = self.intra_op_threads
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise TargetError(f"cpu option intra_op_threads={t!r} must be an int >= 0 (0 = automatic)")
        if self.graph_optimization not in GRAPH_OPTIMIZATION:
            raise TargetError(
                f"cpu option graph_optimization={self.graph_optimization!r} must be one of "
                f"{', '.join(GRAPH_OPTIMIZATION)}"
            )

    @classmethod
    def from_manifest(cls, options: Mapping[str, Any]) -> CpuOptions:
        known = {f.name for f in dataclasses.fields(cls)} - {"timing_inputs"}
        unknown = sorted(set(options) - known - {_DECISIONS})
        if unknown:
            raise TargetError(f"cpu target_options has unknown keys {unknown}; re-export with this edgegate")
        return cls(**{k: v for k, v in options.items() if k in known})

    @classmethod
    def from_strings(cls, user: Mapping[str, str], inputs: Mapping[str, np.ndarray] | None = None) -> CpuOptions:
        """From ``-O key=value`` strings; ``inputs``: representative inputs for the latency-aware trials."""
        values: dict[str, Any] = {}
        for key, text in user.items():
            if key == "intra_op_threads":
                try:
                    values[key] = int(text)
                except ValueError:
                    raise TargetError(f"cpu option intra_op_threads={text!r} must be an int >= 0") from None
            elif key == "graph_optimization":
                values[key] = text
            elif key == "latency_aware":
                if text.lower() not in _TRUE + _FALSE:
                    raise TargetError(f"cpu option latency_aware={text!r} must be true or false")
                values[key] = text.lower() in _TRUE
            else:
                raise TargetError(f"cpu takes no --target-option {key!r}; options: graph_optimization, "
                                  "intra_op_threads, latency_aware")
        return cls(**values, timing_inputs=inputs)

    def to_manifest(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "timing_inputs"}


class CpuTarget(TargetBase):
    name = "cpu"
    description = "ONNX Runtime on the host CPU (CPUExecutionProvider)"
    options_type = CpuOptions
    # MoE blocks export sparse: only routed tokens reach an expert (ORT's QMoE kernel for int8 experts up to
    # 8 tokens, else per-expert gather/scatter; edgegate.onnx_export.passes.lower_moe), the gather/scatter
    # branch kept int8 only where measured faster (cpu_latency). Other targets export dense.
    moe_form = "sparse"

    def options_for_export(self, user: Mapping[str, str], context: Any) -> CpuOptions:
        return CpuOptions.from_strings(user, getattr(context, "calibration_inputs", None))

    def is_available(self) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError as e:
            return (
                False,
                f"onnxruntime is not importable ({e}); pip install onnxruntime (an edgegate dependency)",
            )
        if "CPUExecutionProvider" not in ort.get_available_providers():
            return False, "this onnxruntime build has no CPUExecutionProvider; pip install onnxruntime"
        return True, f"onnxruntime {ort.__version__}"

    def check(self, model: onnx.ModelProto) -> list[CheckIssue]:
        """One issue per node whose op has no ORT CPU kernel, no ONNX function body, no local function."""
        local = {(f.domain, f.name) for f in model.functions}
        issues = []
        for where, node in _walk_nodes(model):
            key = (_norm_domain(node.domain), node.op_type)
            if (node.domain, node.op_type) in local or _ort_runs(*key):
                continue
            issues.append(
                CheckIssue(
                    node=node.name or f"<unnamed node in {where}>",
                    op_type=node.op_type,
                    message=f"op {key[0] or 'ai.onnx'}::{key[1]} (in {where}) has no onnxruntime CPU kernel "
                    "and no model-local function",
                    hint="attach the op's FunctionProto to model.functions (edgegate ops do this on export) "
                    "or use standard ONNX ops",
                )
            )
        return issues

    def compile(self, model: onnx.ModelProto, options: CpuOptions | None, workdir: Path) -> Artifact:
        """Validate `model` and package it as ``model.onnx``; scratch files (the model for the checker, the
        latency-aware trials) go to a temporary directory in ``workdir`` when it exists."""
        options = CpuOptions() if options is None else options
        if not isinstance(options, CpuOptions):
            raise TargetError(f"cpu compile options must be CpuOptions, not {type(options).__name__}")
        try:
            import onnx
        except ImportError as e:
            raise TargetError("compiling for cpu needs onnx; pip install 'edgegate[compile]'") from e
        if not isinstance(model, onnx.ModelProto):
            raise TargetError(f"cpu compile takes an onnx.ModelProto, not {type(model).__name__}")
        external = _external_tensors(model)  # read from the proto: parsing the bytes again would copy every weight
        if external:
            raise TargetError(
                f"model keeps tensor {external[0][0]} in external data {external[0][1]!r}; load it with "
                "onnx.load(..., load_external_data=True) so model.onnx is one file"
            )
        issues = self.check(model)
        if issues:
            shown = "; ".join(f"{i.node}: {i.message}" for i in issues[:3])
            more = f" (and {len(issues) - 3} more)" if len(issues) > 3 else ""
            raise TargetError(f"cpu cannot run {len(issues)} node(s): {shown}{more}; {issues[0].hint}")
        scratch = workdir if workdir is not None and Path(workdir).is_dir() else None
        with tempfile.TemporaryDirectory(prefix="edgegate-cpu-", dir=scratch) as tmp:
            # The checker and the trial session read the serialized model from a file: its bytes are not held
            # beside their copies of the weights (export peak memory); read back when it ships as it is.
            path = Path(tmp) / MODEL_FILE
            with scratch_write(path):
                path.write_bytes(model.SerializeToString())
            try:
                onnx.checker.check_model(str(path), full_check=True)  # the bytes ORT gets, serialized once
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
                raise TargetError(f"model fails the ONNX checker: {_one_line(e)}; fix the export") from e
            release_freed_heap()  # the checker's parsed copies of the model, before ORT makes its own
            _session(str(path), options, "the compiled model")  # ORT must accept it now, not on the device
            release_freed_heap()
            recorded = options.to_manifest()
            if not (options.latency_aware and _has_qdq(model)):
                return Artifact(target=self.name, files={MODEL_FILE: path.read_bytes()}, options=recorded)
            from edgegate.targets.cpu_latency import keep_fast_regions  # compile only: the runtime needs no onnx

            tuned, recorded[_DECISIONS] = keep_fast_regions(model, _timing_inputs(model, options), options, tmp)
        data = tuned.SerializeToString()
        del tuned  # its bytes are what ships: the proto goes before ORT makes its own copy of the weights
        release_freed_heap()
        _session(data, options, "the latency-tuned model")
        return Artifact(target=self.name, files={MODEL_FILE: data}, options=recorded)

    def load(self, bundle_or_artifact: Bundle | Artifact | str | os.PathLike[str]) -> CpuRunner:
        """A runner for a bundle (dir or `Bundle`) or an in-memory `Artifact`; needs only onnxruntime."""
        x = bundle_or_artifact
        if isinstance(x, Artifact):
            options = CpuOptions.from_manifest(x.options)
            return CpuRunner(_session(self.artifact_file(x, MODEL_FILE), options, "the artifact's model"), options)
        from edgegate.bundle import check_onnx_external_data  # the runtime side loads bundle checks on use

        bundle = self.bundle_for(x)
        model_path = bundle.file(MODEL_FILE)
        check_onnx_external_data(model_path, bundle.path)  # again: a Bundle may be built by hand
        options = CpuOptions.from_manifest(bundle.target_options)
        return CpuRunner(_session(str(model_path), options, str(model_path)), options)


class CpuRunner(BaseRunner):
    """Runs one onnxruntime session; `latencies_ms` gets the wall time of each `run` call."""

    target = "cpu"

    def __init__(self, session: Any, options: CpuOptions) -> None:
        super().__init__()
        self._session = session
        self.options = options
        self.input_specs = tuple(
            TensorSpec(
                name=i.name,
                shape=tuple(d if isinstance(d, int) else (d or None) for d in i.shape),
                dtype=np.dtype(_ORT_DTYPES[i.type]) if i.type in _ORT_DTYPES else None,
            )
            for i in session.get_inputs()
        )
        self.output_names = tuple(o.name for o in session.get_outputs())

    def close(self) -> None:
        super().close()
        self._session = None  # drops ORT's session and its memory arena

    def run_impl(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            with self.timed():
                outputs = self._session.run(None, arrays)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidArgument/RuntimeException
            raise TargetError(f"onnxruntime failed to run the model: {_one_line(e)}") from e
        return dict(zip(self.output_names, outputs, strict=True))


def _session(source: bytes | str, options: CpuOptions, what: str) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise TargetError("the cpu target needs onnxruntime; pip install onnxruntime") from e
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION[options.graph_optimization]
    )
    so.log_severity_level = 3  # errors only: library code does not write warnings to the terminal
    try:
        return ort.InferenceSession(source, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises Fail/InvalidGraph/NotImplemented, all one-line-able
        raise TargetError(f"onnxruntime cannot load {what}: {_one_line(e)}") from e


def _has_qdq(model: onnx.ModelProto) -> bool:
    # Subgraphs count: a sparse MoE block's int8 experts live in an If branch (lower_moe).
    return any(n.op_type == "QuantizeLinear" for _, n in _walk_nodes(model))


def _timing_inputs(model: onnx.ModelProto, options: CpuOptions) -> dict[str, np.ndarray]:
    """Every graph input: the representative rows, else seeded random ones of its shape (batch 1 if dynamic)."""
    given = dict(options.timing_inputs or {})
    import onnx

    rng = np.random.default_rng(0)
    out = {}
    for inp in model.graph.input:
        if inp.name in given:
            out[inp.name] = np.asarray(given[inp.name])
            continue
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in inp.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        out[inp.name] = (rng.integers(0, 2, size=shape) if np.dtype(dtype).kind in "iu"
                         else rng.standard_normal(shape)).astype(dtype)
    return out


def _external_tensors(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(tensor name, location) of every tensor kept in external data: initializers of every graph, tensor
    attributes of every node (Constant values; subgraphs and function bodies included)."""
    from edgegate.onnx_export.passes._graph import graphs  # onnx-side helpers: the runtime loads them on use

    tensors = [t for g in graphs(model.graph) for t in g.initializer]
    tensors += [t for _, n in _walk_nodes(model) for a in n.attribute for t in [*a.tensors, *([a.t] if a.HasField("t")
                                                                                              else [])]]
    return [(t.name, e.value) for t in tensors for e in t.external_data if e.key == "location"]


def _walk_nodes(model: onnx.ModelProto):
    """(where, node) for every node: main graph, subgraphs of If/Loop/Scan, and function bodies."""
    stack = [("graph", model.graph.node)] + [
        (f"function {f.domain}::{f.name}", f.node) for f in model.functions
    ]
    while stack:
        where, nodes = stack.pop(0)  # breadth-first: main-graph issues are reported first
        for node in nodes:
            yield where, node
            for a in node.attribute:
                for g in [*a.graphs, *([a.g] if a.HasField("g") else [])]:
                    stack.append((f"subgraph of {node.op_type} {node.name}", g.node))


def _norm_domain(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


@functools.lru_cache(maxsize=1)
def _ort_cpu_kernels() -> frozenset[tuple[str, str]] | None:
    try:  # a private but long-standing onnxruntime API; without it we trust the ONNX schemas
        from onnxruntime.capi._pybind_state import get_all_opkernel_def
    except ImportError:
        return None
    return frozenset(
        (k.domain, k.op_name) for k in get_all_opkernel_def() if k.provider == "CPUExecutionProvider"
    )


@functools.cache
def _ort_runs(domain: str, op_type: str) -> bool:
    import onnx

    kernels = _ort_cpu_kernels()
    if kernels is not None and (domain, op_type) in kernels:
        return True
    if (domain, op_type) == ("", "Constant"):
        return True  # ORT turns Constant nodes into initializers at load; they need no kernel
    if not onnx.defs.has(op_type, domain):
        return False
    if kernels is None:
        return True
    # ORT expands standard ops defined by an ONNX function body (no kernel of their own).
    schema = onnx.defs.get_schema(op_type, domain)
    return schema.has_function or schema.has_context_dependent_function


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
