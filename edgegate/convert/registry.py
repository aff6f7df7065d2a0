"""The converter registry: third-party module classes, by qualified name, -> a converter or a refusal.

Stage: convert (DESIGN §10). Input: registrations made by the converter family modules when they are
imported (``edgegate.convert`` imports each, one line per family). Output: the :class:`ConverterInfo`
of a class, looked up by its ``"module:QualName"`` string, so the third-party package is never
imported here: a model that does not contain the class never reaches its converter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgegate.errors import ExportError

if TYPE_CHECKING:
    from torch import nn

# A converter takes the third-party module and returns (replacement module, gate family). The family is a
# GateKind value, or "" for a replacement that carries no gate (an export form of a layer).
Converter = Callable[[Any], "tuple[nn.Module, str]"]


@dataclass(frozen=True)
class ConverterInfo:
    """One registered class: how it converts (or why it is refused), for ``convert`` and the docs."""

    source_class: str  # "module:QualName"
    converter: Converter | None  # None: refused
    family: str = ""  # gate family of the replacement ("" for none)
    architecture: str = ""  # the model family, for docs/models.md
    becomes: str = ""  # what replaces it, in words (docs/models.md)
    notes: str = ""
    refusal: str = ""  # why the class is refused (converter is None)


_CONVERTERS: dict[str, ConverterInfo] = {}


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _add(info: ConverterInfo) -> None:
    if info.source_class in _CONVERTERS:
        raise ExportError(f"a converter for {info.source_class} is registered already")
    if ":" not in info.source_class:
        raise ExportError(f"register: {info.source_class!r} is not a qualified class name 'package.module:Class'")
    _CONVERTERS[info.source_class] = info


def register(source_class: str, converter: Converter, *, family: str = "", architecture: str = "",
             becomes: str = "", notes: str = "") -> None:
    """Register ``converter`` for the class named ``source_class`` ("module:QualName"); a second
    registration of the same class is an error. The keywords describe it in ``docs/models.md``."""
    _add(ConverterInfo(source_class, converter, family, architecture, becomes, notes))


def refuse(source_class: str, reason: str, *, architecture: str = "") -> None:
    """Declare that models containing ``source_class`` are refused, with ``reason`` (one sentence)."""
    _add(ConverterInfo(source_class, None, architecture=architecture, refusal=reason))


def converters() -> Mapping[str, ConverterInfo]:
    """Every registered class, in registration order."""
    return dict(_CONVERTERS)


def lookup(cls: type) -> ConverterInfo | None:
    return _CONVERTERS.get(class_path(cls))
