"""Converters (DESIGN §10): third-party gating modules -> ``edgegate.nn`` families, weights preserved.

Stage: between ``load`` and ``find_gates``. Input: a loaded ``nn.Module`` (a Hugging Face model, a
user's own network). Output: a :class:`Conversion`: the same model with each recognised third-party
module replaced in place by the ``edgegate.nn`` module of its gate family (so calibration, export and
fidelity see a real gate, not a label), and one :class:`Converted` record per replacement.

A converter is registered by the qualified name of the class it converts (``module:QualName``,
:mod:`edgegate.convert.registry`), so third-party packages are never imported here: a model that
does not contain the class never triggers its converter. Classes known not to fit are registered
as refusals and stop the conversion with the reason. :func:`verify` runs the original and the
converted model on the same rows and reports the largest output difference, overall and per
converted module; the pipeline records it in the manifest and refuses a mismatch beyond tolerance,
naming the module.

The converter families, one module each (adding a family is one module plus one import line below):
``hf_moe`` (transformers sparse-MoE blocks -> ``MoE``), ``hf_qwen3_next`` (Qwen3-Next's gated attention ->
``SigmoidGate``, its delta-net layers -> an export form), ``hf_bitnet`` (BitNet layers -> ``TernaryLinear``).
``python -m edgegate.convert --markdown`` prints the table of ``docs/models.md`` from the registry.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

# The converter families: each registers its classes when imported.
from edgegate.convert import hf_bitnet, hf_moe, hf_qwen3_next  # noqa: F401
from edgegate.convert.registry import ConverterInfo, class_path, converters, lookup, refuse, register
from edgegate.errors import ExportError
from edgegate.gates import GateKind, family_of

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

__all__ = ["Conversion", "Converted", "ConverterInfo", "class_path", "convert", "converters", "refuse", "register",
           "verify"]

log = logging.getLogger(__name__)

# Class names that look like a sparse-MoE block: one that no converter knows is reported, since it would
# export as plain ops with no gate.
_MOE_LIKE = re.compile(r"(Sparse)?Mo[Ee](Block|Layer|MLP)?$")


@dataclass(frozen=True)
class Converted:
    """One replaced module: its path in the model, the class it was and the edgegate class it became."""

    path: str
    source_class: str  # "module:QualName" of the third-party class
    target_class: str  # the edgegate class that replaced it
    family: str  # gate family (a GateKind value; "" for a replacement without a gate)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "source_class": self.source_class, "target_class": self.target_class,
                "family": self.family}


@dataclass(frozen=True)
class Conversion:
    """The converted model and what was replaced (empty when the model had nothing to convert)."""

    module: Any  # nn.Module
    converted: tuple[Converted, ...] = ()
    checks: dict[str, Any] = field(default_factory=dict)  # filled by verify(): max errors, rows
    unrecognised: tuple[str, ...] = ()  # paths of MoE-like modules no converter knows

    def to_dict(self) -> dict[str, Any]:
        out = {"converted": [c.to_dict() for c in self.converted], **self.checks}
        if self.unrecognised:
            out["unrecognised"] = list(self.unrecognised)
        return out


def convert(model: nn.Module) -> Conversion:
    """Replace every module of ``model`` whose class has a converter (outermost first; a converted
    module's children are not visited again). ``model`` itself is modified in place and returned.
    A module whose class is refused raises ``ExportError`` naming it and why, before anything changes."""
    found: list[tuple[str, nn.Module, ConverterInfo]] = []
    unknown: list[str] = []
    for path, module in model.named_modules():
        if any(path == p or path.startswith(f"{p}.") for p, _, _ in found):
            continue
        info = lookup(type(module))
        if info is None:
            # One with a registered gate inside (edgegate's own MoE, a user's registered router) has its gate.
            if (_MOE_LIKE.search(type(module).__name__) and hasattr(module, "experts")
                    and not any(family_of(m) is not None for m in module.modules())):
                unknown.append(path)
            continue
        if info.converter is None:
            raise ExportError(f"{path or '<model>'} is a {info.source_class} ({info.architecture}), which edgegate "
                              f"refuses: {info.refusal}")
        found.append((path, module, info))
    if unknown:
        log.warning("no converter knows the MoE-like module(s) %s: they export as plain ops, without a gate",
                    ", ".join(unknown))
    done: list[Converted] = []
    for path, module, info in found:
        try:
            new, family = info.converter(module)
        except ExportError as e:
            raise ExportError(f"{path or '<model>'}: {e}") from e
        if path:
            parent, _, leaf = path.rpartition(".")
            model.get_submodule(parent).register_module(leaf, new)
        else:
            model = new
        done.append(Converted(path, info.source_class, class_path(type(new)), str(family)))
    return Conversion(model, tuple(done), unrecognised=tuple(unknown))


def verify(original: nn.Module, conversion: Conversion, inputs: Mapping[str, np.ndarray],
           atol: float = 1e-3) -> Conversion:
    """Run ``original`` and the converted model on ``inputs`` (arrays keyed by input name, batch first);
    returns the conversion with ``checks`` filled in, or raises ``ExportError`` naming the module at fault.

    Each converted module is run on exactly what the original module received and must reproduce its
    output within ``atol`` (``checks["modules"]``). The whole model must too (``checks["max_abs_err"]``),
    except when a converted module quantizes its activations in the graph (BitNet layers: per-token
    8-bit rounding): there, a difference of one float ulp upstream may legitimately move an activation
    across a rounding boundary and the output by one quantization step, so the end-to-end difference
    is recorded but the per-module check decides. A conversion that replaced nothing is returned
    unchanged."""
    if not conversion.converted:
        return conversion
    import numpy as np
    import torch

    feeds = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
    per_module: dict[str, float] = {c.path or "<model>": 0.0 for c in conversion.converted}
    pending: dict[str, list[tuple[tuple, dict]]] = {c.path: [] for c in conversion.converted}

    def before(path: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            # A copy: the module may update its inputs in place (a KV cache) before the replacement runs.
            pending[path].append((copy.deepcopy(args), copy.deepcopy(kwargs)))
        return hook

    def after(path: str):
        replacement = conversion.module.get_submodule(path)

        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            # Compared here and dropped: one module's inputs are held at a time, whatever the model's size.
            args, kwargs = pending[path].pop()
            err = _max_err(_outputs(out), _outputs(replacement(*args, **kwargs)))
            per_module[path or "<model>"] = max(per_module[path or "<model>"], err)
        return hook

    handles = []
    for c in conversion.converted:
        module = original.get_submodule(c.path)
        handles += [module.register_forward_pre_hook(before(c.path), with_kwargs=True),
                    module.register_forward_hook(after(c.path), with_kwargs=True)]
    try:
        # Eager: third-party layers may be torch.compile'd (BitNet), which would compile on every machine.
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            want = _outputs(original(**feeds))
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        got = _outputs(conversion.module(**feeds))
    rows = int(next(iter(feeds.values())).shape[0])
    err = _max_err(want, got)
    rounding = any(c.family == GateKind.TERNARY for c in conversion.converted)  # rounds activations per token
    checks = {"max_abs_err": err, "rows": rows, "atol": atol, "modules": per_module,
              "end_to_end": "recorded (in-graph activation rounding)" if rounding else "checked"}
    worst = max(per_module, key=per_module.get)
    if per_module[worst] > atol:
        raise ExportError(f"the converted module {worst} differs from the original by {per_module[worst]:.3g} "
                          f"(> {atol}) on {rows} calibration rows; please report this model")
    if not rounding and not err <= atol:
        raise ExportError(f"the converted model differs from the original by {err:.3g} (> {atol}) on {rows} "
                          f"calibration rows although each converted module agrees within "
                          f"{per_module[worst]:.3g} (largest at {worst}); please report this model")
    return Conversion(conversion.module, conversion.converted, checks, conversion.unrecognised)


def _outputs(out: Any) -> list[Any]:
    if isinstance(out, (tuple, list)):
        return [o for o in out if hasattr(o, "is_floating_point")]
    if hasattr(out, "logits") and not hasattr(out, "is_floating_point"):  # a transformers ModelOutput
        return [out.logits]
    return [out]


def _max_err(want: list[Any], got: list[Any]) -> float:
    return max((float((w.double() - g.double()).abs().max()) for w, g in zip(want, got, strict=True)
                if w.is_floating_point() and w.numel()), default=0.0)
