"""Stage 6, targets: the types every target shares and the protocols a target implements (DESIGN.md §7).

Input: nothing but numpy; this module imports neither torch nor onnx, so the runtime side (numpy +
onnxruntime) can load bundles through it. Output: the records passed between the export pipeline and a
target (`CheckIssue`, `Artifact`, `TensorSpec`, `CompileContext`), the `Target` and `Runner` protocols,
and the parts the built-in targets share so each checks and loads the same way:

* `BaseRunner.run` checks the feeds against the runner's `input_specs` (names, dtypes, fixed dims) in one
  place and then calls the target's ``run_impl``, as Polygraphy's ``BaseRunner.infer`` checks before
  ``infer_impl``; ``timed()`` records the latency of the part the target measures.
* `TargetBase` holds the defaults of the protocol's optional members (no options, runs where it is
  available, reference-graph golden checks), and `bundle_for` / `artifact_file` load what a runner needs
  from a bundle directory, a `Bundle` or an in-memory `Artifact`, refusing another target's.

A third-party target implements `Target` (subclassing `TargetBase` gives it the defaults) and registers
under the entry-point group ``edgegate.targets``.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from edgegate.errors import TargetError
from edgegate.schemes import QuantScheme

if TYPE_CHECKING:
    import onnx

    from edgegate.bundle import Bundle


@dataclasses.dataclass(frozen=True)
class CheckIssue:
    """One node the target cannot compile, found before compiling."""

    node: str
    op_type: str
    message: str
    hint: str = ""


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A compiled model: bundle file name -> contents, and the target options for the manifest."""

    target: str
    files: dict[str, bytes]
    options: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A runner input: dims are ints, or a str/None for a dynamic dim; dtype None if numpy has none."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype | None


@dataclasses.dataclass(frozen=True)
class CompileContext:
    """What the export pipeline knows beyond the ONNX graph, for targets that need it.

    ``calibration_inputs`` holds representative inputs, one array per model input (the calibration
    split when the export quantizes, else the golden samples): the snn target balances thresholds on
    them, trt may build int8 calibration-free from the graph's Q/DQ scales and ignore them.
    ``inputs`` describes every model input (batch first: None when dynamic); ``input_name`` and
    ``calibration`` are the first input's, for targets that take one input.
    """

    quant: QuantScheme = QuantScheme.FP32
    batch: int | None = None
    input_name: str = "x"
    output_names: tuple[str, ...] = ()
    calibration: np.ndarray | None = None
    dataset: str | None = None
    inputs: tuple[TensorSpec, ...] = ()
    calibration_inputs: Mapping[str, np.ndarray] | None = None


@runtime_checkable
class Runner(Protocol):
    """Runs a loaded model. A context manager (exit releases the session); records per-run latency.

    ``metrics()`` returns what the runtime counted on the last run (e.g. the snn emulator's spikes and
    energy) or None; ``bench_notes`` says how to read bench's lines for this target ({} for most).
    """

    input_specs: tuple[TensorSpec, ...]
    output_names: tuple[str, ...]
    latencies_ms: list[float]
    bench_notes: Mapping[str, str]

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc: object) -> None: ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def metrics(self) -> dict[str, Any] | None: ...


@runtime_checkable
class Target(Protocol):
    """A compile target. `options_type` is the frozen dataclass that `compile` accepts.

    ``qdq_form``: the quantized-graph form the target's graphs take (``quantization.plan.QdqForm`` value:
    ``asymmetric`` uint8 activations for ONNX Runtime, ``symmetric`` int8, zero point 0).
    ``needs_calibration``: the target uses representative inputs even for float exports (the snn target balances
    its thresholds on them).
    ``golden_on_reference``: the bundle's ``model.onnx`` is another runtime's graph, so golden outputs taken
    with ONNX Runtime use basic optimizations only (its CPU fusions would requantize on the fly).
    ``moe_form``: how a MoE block's experts are exported (``nn.routed_experts.MoEForm`` value): ``dense`` (every
    expert on every token) or ``sparse`` (one ``RoutedExperts`` op the target lowers to routed compute).
    ``option_aliases``: short CLI names for ``-O`` keys (alias -> key).
    """

    name: str
    description: str
    options_type: type
    qdq_form: str
    needs_calibration: bool
    golden_on_reference: bool
    moe_form: str
    option_aliases: Mapping[str, str]

    def is_available(self) -> tuple[bool, str]:
        """(available, reason); the reason names the pip extra to install when unavailable."""
        ...

    def can_run(self) -> tuple[bool, str]:
        """Whether a compiled artifact runs on this machine; when it does, golden outputs come from the
        target's own runner, else from ONNX Runtime on ``model.onnx``."""
        ...

    def options_for_export(self, user: Mapping[str, str], context: CompileContext) -> Any:
        """Compile options from ``-O KEY=VALUE`` strings and the export context (None: the defaults)."""
        ...

    def check(self, model: onnx.ModelProto) -> list[CheckIssue]: ...

    def compile(self, model: onnx.ModelProto, options: Any, workdir: Path) -> Artifact:
        """Compile `model`; `options` is an `options_type` or None for defaults; writes only in workdir."""
        ...

    def load(self, bundle_or_artifact: Bundle | Artifact | str | os.PathLike[str]) -> Runner: ...

    def describe(self, bundle: Bundle, *, trust_model: bool = False) -> dict[str, Any] | None:
        """What ``inspect`` shows of a bundle beyond its manifest and graph (trt: the engine's layers);
        None when there is nothing more."""
        ...

    def option_names(self) -> list[str]:
        """The ``-O`` keys the target takes (``edgegate targets`` lists them)."""
        ...


class TargetBase:
    """Defaults for `Target`'s optional members; the built-in targets and plugins may subclass it."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options_type: ClassVar[type] = type(None)
    qdq_form: ClassVar[str] = "asymmetric"
    needs_calibration: ClassVar[bool] = False
    golden_on_reference: ClassVar[bool] = False
    moe_form: ClassVar[str] = "dense"
    option_aliases: ClassVar[Mapping[str, str]] = {}

    def is_available(self) -> tuple[bool, str]:
        return True, ""

    def can_run(self) -> tuple[bool, str]:
        return self.is_available()

    def options_for_export(self, user: Mapping[str, str], context: CompileContext) -> Any:
        if user:
            raise TargetError(f"target {self.name} takes no -O option (got {', '.join(sorted(user))})")
        return None

    def describe(self, bundle: Bundle, *, trust_model: bool = False) -> dict[str, Any] | None:
        return None

    def option_names(self) -> list[str]:
        """The ``-O`` keys: the fields of ``options_type`` that are settings (data fields compare=False are
        not), then the aliases as ``alias=key``."""
        names = [f.name for f in dataclasses.fields(self.options_type) if f.compare] \
            if dataclasses.is_dataclass(self.options_type) else []
        return names + [f"{a}={k}" for a, k in self.option_aliases.items()]

    def bundle_for(self, x: Bundle | str | os.PathLike[str]) -> Bundle:
        """``x`` read and verified as a bundle (a `Bundle` is taken as it is) of this target."""
        from edgegate.bundle import Bundle, read_bundle  # the bundle module reads manifests: loaded on use

        bundle = x if isinstance(x, Bundle) else read_bundle(x)
        if bundle.target != self.name:
            raise TargetError(f"bundle {bundle.path} is for target {bundle.target!r}, not {self.name}; "
                              "load it with that target")
        return bundle

    def artifact_file(self, artifact: Artifact, name: str) -> bytes:
        """File ``name`` of an in-memory artifact compiled for this target."""
        if artifact.target != self.name or name not in artifact.files:
            raise TargetError(f"artifact for target {artifact.target!r} has no {self.name} {name}; "
                              f"compile for {self.name}")
        return artifact.files[name]


class BaseRunner(contextlib.AbstractContextManager, abc.ABC):
    """The input checks and latency record every built-in runner shares.

    A subclass sets ``input_specs`` and ``output_names`` and implements ``run_impl(arrays)`` (the feeds,
    checked, as contiguous arrays in ``input_specs`` order) and ``close()``; it wraps the part it wants
    timed in ``with self.timed():``. ``what`` names the runtime's model in messages.
    """

    target: ClassVar[str] = ""
    what: ClassVar[str] = "model"
    bench_notes: ClassVar[Mapping[str, str]] = {}

    input_specs: tuple[TensorSpec, ...]
    output_names: tuple[str, ...]

    def __init__(self) -> None:
        self.latencies_ms: list[float] = []
        self.closed = False

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.closed = True

    def metrics(self) -> dict[str, Any] | None:
        return None

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.closed:
            raise TargetError(f"{self.target} runner is closed; load the bundle again")
        return self.run_impl(check_feeds(self.input_specs, feeds, self.what))

    @abc.abstractmethod
    def run_impl(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the checked feeds; the target's own part of ``run``."""

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.latencies_ms.append((time.perf_counter() - start) * 1e3)


def refusal(target: str, issues: list[CheckIssue]) -> str:
    """One line for a target's check issues: the first in full, then how many more."""
    i = issues[0]
    more = f" (+{len(issues) - 1} more)" if len(issues) > 1 else ""
    return f"target {target} cannot take node {i.node} ({i.op_type}): {i.message}; {i.hint}{more}"


def check_feeds(specs: tuple[TensorSpec, ...], feeds: Mapping[str, np.ndarray], what: str = "model"
                ) -> dict[str, np.ndarray]:
    """``feeds`` as contiguous arrays in ``specs`` order, after checking names, dtypes and fixed dims."""
    expected = [s.name for s in specs]
    missing, extra = [n for n in expected if n not in feeds], sorted(set(feeds) - set(expected))
    if missing or extra:
        raise TargetError(f"inputs missing {missing}, unexpected {extra}; the {what} takes {expected}")
    arrays = {}
    for spec in specs:
        a = np.ascontiguousarray(feeds[spec.name])
        if spec.dtype is not None and a.dtype != spec.dtype:
            raise TargetError(f"input {spec.name} has dtype {a.dtype}, the {what} wants {spec.dtype}; cast it")
        if a.ndim != len(spec.shape) or any(
                isinstance(d, int) and d != n for d, n in zip(spec.shape, a.shape, strict=True)):
            raise TargetError(f"input {spec.name} has shape {a.shape}, the {what} wants {spec.shape}")
        arrays[spec.name] = a
    return arrays
