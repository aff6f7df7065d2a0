"""Stage 6, targets: the registry of compile targets and the interfaces they implement (DESIGN.md §7).

Input: an ``onnx.ModelProto`` (QDQ graph with the ``edgegate`` model-local functions). A target
checks it (`CheckIssue` list), compiles it (`Artifact`: the files that go into the bundle and the
options recorded in the manifest) and loads a bundle or artifact into a `Runner` that runs it.

Targets are registered explicitly by name (`register`); third-party targets come from the entry-point
group ``edgegate.targets`` (an object with the `Target` attributes, or a zero-argument callable that
returns one). A plugin that fails to import is listed as unavailable with its error, not a crash.

This module imports neither torch nor onnx, so the runtime side (numpy + onnxruntime) can use it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from edgegate.errors import TargetError

if TYPE_CHECKING:
    import onnx

    from edgegate.bundle import Bundle

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "edgegate.targets"


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

    quant: str = "fp32"  # fp32 | fp16 | int8 | ternary
    batch: int | None = None
    input_name: str = "x"
    output_names: tuple[str, ...] = ()
    calibration: np.ndarray | None = None
    dataset: str | None = None
    inputs: tuple[TensorSpec, ...] = ()
    calibration_inputs: Mapping[str, np.ndarray] | None = None


@runtime_checkable
class Runner(Protocol):
    """Runs a loaded model. A context manager (exit releases the session); records per-run latency."""

    input_specs: tuple[TensorSpec, ...]
    output_names: tuple[str, ...]
    latencies_ms: list[float]

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc: object) -> None: ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@runtime_checkable
class Target(Protocol):
    """A compile target. `options_type` is the frozen dataclass that `compile` accepts."""

    name: str
    description: str
    options_type: type

    def is_available(self) -> tuple[bool, str]:
        """(available, reason); the reason names the pip extra to install when unavailable."""
        ...

    def check(self, model: onnx.ModelProto) -> list[CheckIssue]: ...

    def compile(self, model: onnx.ModelProto, options: Any, workdir: Path) -> Artifact:
        """Compile `model`; `options` is an `options_type` or None for defaults; writes only in workdir."""
        ...

    def load(self, bundle_or_artifact: Bundle | Artifact | str | os.PathLike[str]) -> Runner: ...

    # Optional, looked up with getattr by the pipeline:
    #   options_for_export(user: Mapping[str, str], context: CompileContext) -> options_type
    #       builds compile options from `--target-option KEY=VALUE` strings and the export context;
    #       a target without it takes no options.
    #   can_run() -> tuple[bool, str]
    #       whether a compiled artifact can run on this machine (default: is_available()); when it
    #       can, golden outputs come from the target's own runner, else from ONNX Runtime on model.onnx.


def options_for_export(target: Target, user: Mapping[str, str], context: CompileContext) -> Any:
    """Compile options for `target` from CLI strings and the export context (None: the defaults)."""
    make = getattr(target, "options_for_export", None)
    if make is not None:
        return make(dict(user), context)
    if user:
        raise TargetError(f"target {target.name} takes no --target-option (got {', '.join(sorted(user))})")
    return None


def refusal(target: str, issues: list[CheckIssue]) -> str:
    """One line for a target's check issues: the first in full, then how many more."""
    i = issues[0]
    more = f" (+{len(issues) - 1} more)" if len(issues) > 1 else ""
    return f"target {target} cannot take node {i.node} ({i.op_type}): {i.message}; {i.hint}{more}"


def compile_model(model: onnx.ModelProto, target: str = "cpu", options: Any = None,
                  workdir: str | os.PathLike[str] | None = None) -> Artifact:
    """Check and compile an ONNX model for the target called ``target`` (the API form of the pipeline's
    check + compile steps). ``options``: the target's ``options_type`` or None; ``workdir``: scratch
    directory (a temporary one by default). Raises ``TargetError`` listing the nodes ``check`` refuses."""
    import tempfile

    t = get(target)
    ok, why = t.is_available()
    if not ok:
        raise TargetError(f"target {target} is not available here: {why}")
    problems = t.check(model)
    if problems:
        raise TargetError(refusal(target, problems))
    if workdir is not None:
        return t.compile(model, options, Path(workdir))
    with tempfile.TemporaryDirectory(prefix="edgegate-compile-") as tmp:
        return t.compile(model, options, Path(tmp))


def can_run(target: Target) -> tuple[bool, str]:
    """Whether an artifact of `target` can run here (golden outputs, bench)."""
    probe = getattr(target, "can_run", None)
    return probe() if probe is not None else target.is_available()


# --------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Target] = {}
_plugins_loaded = False


def register(target: Target) -> Target:
    """Add `target` under its name; a second target with the same name is an error."""
    name = getattr(target, "name", None)
    if not isinstance(name, str) or not name:
        raise TargetError(f"cannot register {target!r}: a target needs a non-empty str `name`")
    if name in _REGISTRY:
        raise TargetError(
            f"target {name!r} is already registered (by {type(_REGISTRY[name]).__module__}); "
            "give the new target another name"
        )
    _REGISTRY[name] = target
    return target


def get(name: str) -> Target:
    """The target called `name`; unknown names raise TargetError listing the known ones."""
    _load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise TargetError(f"unknown target {name!r}; known targets: {known}") from None


def all_targets() -> list[Target]:
    """Every registered target, plugins included (broken plugins appear as unavailable), by name."""
    _load_plugins()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


@dataclasses.dataclass(frozen=True)
class UnavailablePlugin:
    """Stands in for a plugin target that failed to load, so listing targets can explain why."""

    name: str
    error: str
    description: str = "plugin that failed to load"
    options_type: type = type(None)

    def is_available(self) -> tuple[bool, str]:
        return False, f"plugin failed to load: {self.error}"

    def _fail(self) -> TargetError:
        return TargetError(f"target {self.name!r} is unavailable: plugin failed to load ({self.error})")

    def check(self, model: onnx.ModelProto) -> list[CheckIssue]:
        raise self._fail()

    def compile(self, model: onnx.ModelProto, options: Any, workdir: Path) -> Artifact:
        raise self._fail()

    def load(self, bundle_or_artifact: Any) -> Runner:
        raise self._fail()


def _entry_points() -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def _load_plugins() -> None:
    """Load the entry-point group once; never raises: a broken plugin becomes an `UnavailablePlugin`."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in _entry_points():
        if ep.name in _REGISTRY:
            log.warning("target plugin %s (%s) ignored: a target named %r exists", ep.name, ep.value, ep.name)
            continue
        try:
            obj = ep.load()
            # A class or factory is called; note a Target *class* also passes isinstance(obj, Target).
            target = obj() if isinstance(obj, type) or not isinstance(obj, Target) and callable(obj) else obj
            if not isinstance(target, Target):
                raise TypeError(f"{ep.value} is not a Target (needs name, check, compile, load, ...)")
            if target.name != ep.name:
                raise TypeError(f"{ep.value} names its target {target.name!r}, entry point says {ep.name!r}")
        except Exception as e:  # any failure inside third-party code: record it, keep going
            log.warning("target plugin %s (%s) failed to load: %s", ep.name, ep.value, e)
            target = UnavailablePlugin(name=ep.name, error=f"{type(e).__name__}: {e}")
        register(target)


# Built-in targets, registered explicitly (imported last: they use the types defined above).
from edgegate.targets import cpu as _cpu  # noqa: E402

register(_cpu.CpuTarget())
from edgegate.targets import trt as _trt  # noqa: E402

register(_trt.TrtTarget())
from edgegate.targets import snn as _snn  # noqa: E402

register(_snn.SnnTarget())
