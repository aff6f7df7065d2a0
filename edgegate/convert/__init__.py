"""Converters (DESIGN §10): third-party gating modules -> ``edgegate.nn`` families, weights preserved.

Stage: between ``load`` and ``find_gates``. Input: a loaded ``nn.Module`` (a Hugging Face model, a
user's own network). Output: a :class:`Conversion`: the same model with each recognised third-party
module replaced in place by the ``edgegate.nn`` module of its gate family (so calibration, export and
fidelity see a real gate, not a label), and one :class:`Converted` record per replacement.

A converter is registered by the qualified name of the class it converts (``module:QualName``), so
third-party packages are never imported here: a model that does not contain the class never
triggers its converter. :func:`verify` runs the original and the converted model on the same rows and
reports the largest output difference; the pipeline records it in the manifest and refuses a
mismatch beyond tolerance, naming the module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgegate.errors import ExportError

if TYPE_CHECKING:
    import numpy as np
    from torch import nn


@dataclass(frozen=True)
class Converted:
    """One replaced module: its path in the model, the class it was and the edgegate class it became."""

    path: str
    source_class: str  # "module:QualName" of the third-party class
    target_class: str  # the edgegate.nn class that replaced it
    family: str  # gate family (a GateKind value)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "source_class": self.source_class, "target_class": self.target_class,
                "family": self.family}


@dataclass(frozen=True)
class Conversion:
    """The converted model and what was replaced (empty when the model had nothing to convert)."""

    module: Any  # nn.Module
    converted: tuple[Converted, ...] = ()
    checks: dict[str, Any] = field(default_factory=dict)  # filled by verify(): max errors, rows

    def to_dict(self) -> dict[str, Any]:
        return {"converted": [c.to_dict() for c in self.converted], **self.checks}


# A converter takes the third-party module and returns (replacement module, gate family).
Converter = Callable[[Any], "tuple[nn.Module, str]"]
_CONVERTERS: dict[str, Converter] = {}


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def register(source_class: str, converter: Converter) -> None:
    """Register ``converter`` for the class named ``source_class`` ("module:QualName"); a second
    registration of the same class is an error."""
    if source_class in _CONVERTERS:
        raise ExportError(f"a converter for {source_class} is registered already")
    _CONVERTERS[source_class] = converter


def converters() -> Mapping[str, Converter]:
    return dict(_CONVERTERS)


def convert(model: nn.Module) -> Conversion:
    """Replace every module of ``model`` whose class has a converter (outermost first; a converted
    module's children are not visited again). ``model`` itself is modified in place and returned."""
    done: list[Converted] = []
    skip: list[str] = []
    for path, module in list(model.named_modules()):
        if any(path == s or path.startswith(f"{s}.") for s in skip):
            continue
        converter = _CONVERTERS.get(class_path(type(module)))
        if converter is None:
            continue
        new, family = converter(module)
        if path:
            parent, _, leaf = path.rpartition(".")
            model.get_submodule(parent).register_module(leaf, new)
        else:
            model = new
        done.append(Converted(path, class_path(type(module)), class_path(type(new)), str(family)))
        skip.append(path)
    return Conversion(model, tuple(done))


def verify(original: nn.Module, conversion: Conversion, inputs: Mapping[str, np.ndarray],
           atol: float = 1e-3) -> Conversion:
    """Run ``original`` and the converted model on ``inputs`` (arrays keyed by input name, batch first);
    returns the conversion with ``checks`` filled in, or raises ``ExportError`` when the outputs differ by
    more than ``atol``. A conversion that replaced nothing is returned unchanged."""
    if not conversion.converted:
        return conversion
    import numpy as np
    import torch

    feeds = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
    with torch.no_grad():
        want, got = _outputs(original(**feeds)), _outputs(conversion.module(**feeds))
    err = max(float((w.double() - g.double()).abs().max()) for w, g in zip(want, got, strict=True)
              if w.is_floating_point())
    checks = {"max_abs_err": err, "rows": int(next(iter(feeds.values())).shape[0]), "atol": atol}
    if not err <= atol:
        names = ", ".join(c.path or "<model>" for c in conversion.converted)
        raise ExportError(f"the converted model differs from the original by {err:.3g} (> {atol}) on "
                          f"{checks['rows']} calibration rows; converted modules: {names}")
    return Conversion(conversion.module, conversion.converted, checks)


def _outputs(out: Any) -> list[Any]:
    if isinstance(out, (tuple, list)):
        return [o for o in out if hasattr(o, "is_floating_point")]
    return [out]
