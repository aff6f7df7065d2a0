"""Stage 6, targets: the registry of compile targets (DESIGN.md §7); the types and protocols are `base`'s.

Input: an ``onnx.ModelProto`` (QDQ graph with the ``edgegate`` model-local functions). A target
checks it (`CheckIssue` list), compiles it (`Artifact`: the files that go into the bundle and the
options recorded in the manifest) and loads a bundle or artifact into a `Runner` that runs it.

Targets are registered explicitly by name (`register`): the built-in ones below, third-party ones from
the entry-point group ``edgegate.targets`` (a `Target`, e.g. a `TargetBase` subclass, or a zero-argument
callable that returns one). A plugin that fails to import is listed as unavailable with its error, not a
crash. Adding a built-in target is one module plus its line in ``BUILTIN``.

This module imports neither torch nor onnx, so the runtime side (numpy + onnxruntime) can use it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgegate.errors import TargetError
from edgegate.targets.base import (
    Artifact,
    BaseRunner,
    CheckIssue,
    CompileContext,
    Runner,
    Target,
    TargetBase,
    TensorSpec,
    check_feeds,
    refusal,
)
from edgegate.targets.cpu import CpuTarget
from edgegate.targets.snn import SnnTarget
from edgegate.targets.trt import TrtTarget

if TYPE_CHECKING:
    import onnx

__all__ = ["BUILTIN", "Artifact", "BaseRunner", "CheckIssue", "CompileContext", "Runner", "Target", "TargetBase",
           "TensorSpec", "all_targets", "can_run", "check_feeds", "compile_model", "get", "options_for_export",
           "refusal", "register"]
BUILTIN: tuple[type, ...] = (CpuTarget, TrtTarget, SnnTarget)

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "edgegate.targets"


def options_for_export(target: Target, user: Mapping[str, str], context: CompileContext) -> Any:
    """Compile options for `target` from ``-O`` strings (aliases resolved) and the export context."""
    aliases = target.option_aliases
    return target.options_for_export({aliases.get(k, k): v for k, v in user.items()}, context)


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
    return target.can_run()


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


class UnavailablePlugin(TargetBase):
    """Stands in for a plugin target that failed to load, so listing targets can explain why."""

    description = "plugin that failed to load"

    def __init__(self, name: str, error: str) -> None:
        self.name, self.error = name, error  # type: ignore[misc]  # per instance, not the class default

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
                raise TypeError(f"{ep.value} is not a Target (subclass edgegate.targets.TargetBase and define name, "
                                "check, compile, load)")
            if target.name != ep.name:
                raise TypeError(f"{ep.value} names its target {target.name!r}, entry point says {ep.name!r}")
        except Exception as e:  # any failure inside third-party code: record it, keep going
            log.warning("target plugin %s (%s) failed to load: %s", ep.name, ep.value, e)
            target = UnavailablePlugin(name=ep.name, error=f"{type(e).__name__}: {e}")
        register(target)


for _builtin in BUILTIN:
    register(_builtin())
