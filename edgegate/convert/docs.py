"""``docs/models.md``, generated from the converter and gate-family registries so that it cannot drift.

Stage: documentation. Input: ``edgegate.convert.converters()`` and ``edgegate.gates.families()``.
Output: the Markdown text of ``docs/models.md`` (``python -m edgegate.convert --markdown``; a test
regenerates it and compares).
"""

from __future__ import annotations

from edgegate.convert.registry import ConverterInfo, converters
from edgegate.gates import Observe, families

_OBSERVE = {
    Observe.EXITS: "exits: rows per stage, thresholds augmented and re-tuned, exit agreement",
    Observe.ROUTES: "routes: rows per expert, routing widened for coverage, top-k set / top-1 agreement",
    Observe.DECISION: "decision: `last_decision` compared float vs quantized (mask Hamming / gate MAE)",
    Observe.STATIC: "static: nothing data-dependent to observe",
    Observe.LEARNERS: "learners: rows per learner, counts widened for coverage, learner-count agreement",
}

_INTRO = """\
# Supported models and gate families

*Generated from the registries by `python -m edgegate.convert --markdown`; do not edit by hand
(`tests/unit/test_docs_models.py` fails when this file and the code disagree).*

edgegate deploys models built from `edgegate.nn` and models brought from elsewhere. A third-party
module is supported when a **converter** replaces it, weights preserved, by the `edgegate.nn` module of
its gate family, so calibration, export and fidelity treat it as a gate (a label alone is not support).
Converters are registered by the qualified name of the class they convert and read its attributes:
`transformers` is never imported unless the model holds one of these classes. At export, the converted
model is checked against the original on calibration rows (each converted module on exactly what the
original received, and the whole model), the largest errors go into the manifest, and a mismatch
beyond tolerance stops the export naming the module.
"""

_HOW_TO = """\
## Adding a converter

1. Write one module in `edgegate/convert/` with a function `convert(module) -> (replacement, family)` that
   builds the `edgegate.nn` module computing what `module` computes, from its weights (read attributes;
   do not import the third-party package), and call
   `edgegate.convert.register("package.module:Class", convert, family=..., architecture=..., becomes=...)`.
   A class that cannot be converted faithfully is declared with `edgegate.convert.refuse(path, reason)`.
2. Add one import line in `edgegate/convert/__init__.py`, and regenerate this file.
3. Test it the way `tests/unit/test_convert.py` does: build the original from its own config class with
   seeded weights and compare outputs; `edgegate.convert.verify` runs that check at every export.

A transformers MoE block whose router is softmax or sigmoid top-k (optional renormalization,
score-correction bias, scaling factor, shared expert with or without a sigmoid gate) and whose experts
hold fused `gate_up_proj` / `down_proj` weights is one `BlockSpec` line in `edgegate/convert/hf_moe.py`.

## Adding a gate family

A gate family is one module that defines the `edgegate.nn` class and declares, with
`edgegate.gates.register_family(cls, GateFamily(kind, observe, details=..., decision_layers=...))`, how
edgegate treats it: what the manifest records, which layers compute its decision (kept in float by the
gate precision policy), and which protocol calibration and fidelity observe. Add the module to
`edgegate.gates.FAMILY_MODULES`. The built-in families below are declared the same way.

`edgegate.gates.register(cls, kind)` is the short form for a user's own class. For `exit`, `router`,
`ternary` and `lowrank` it is refused unless the class subclasses the `edgegate.nn` protocol class
(`EarlyExitNet`, `TopKRouter`, `TernaryLinear`, `HGFLinear`): a label cannot make a module calibrate or
export as one. `sigmoid`, `threshold` and `channel` classes become *observed* gates: listed in the
manifest, their decision layers (`decision_layers=` or a `decision_layers()` method) kept in float,
their `last_decision` (when the module records one) compared float vs quantized. The exported graph
keeps such a gate by name only if its forward calls an `edgegate.ops` op.

## Adding a gate kind

A kind of gate edgegate does not know is a name, declared in one module: the module class records
`last_decision` after each eval forward, `edgegate.calibration.kinds.register_measure(GateMeasure(name,
metrics, measure, rows=..., capture=..., pair=...))` says how calibration measures it (its metrics with
their words and which way is better; the held-out metrics from the recorded float and quantized decisions;
optionally the hooks that keep its decision scores and how two captures become margin `Decisions`, which
lets the fidelity-target search hold its metric), and `register_family(cls, GateFamily(name,
Observe.DECISION))` makes its modules gates. The built-in kinds are declared the same way in
`edgegate/calibration/kinds.py`; `tests/unit/test_user_gate_kind.py` declares one end to end.

## Your own early-exit network

A network whose `forward` decides in Python (`if confidence > t: return ...`) cannot be exported as
is. Wrap its parts, trained weights kept:

```python
from edgegate.nn import EarlyExitNet

net = EarlyExitNet.wrap(stages=[block1, block2, block3], heads=[exit1, exit2, classifier],
                        thresholds=[0.9, 0.8], policy="maxprob")
```

Sample b leaves at exit k when `max softmax(heads[k](h)) >= thresholds[k]` (`policy="learned"` takes
trained `exit_gates=`). The result exports with ONNX `If` at batch 1 and batch compaction otherwise,
calibrates gate-aware (re-tuned thresholds) and reports exit agreement, like the built-in ones. It has no
JSON config: pass it to the Python API, or save it whole with `torch.save(net, path)` and export that
file with `--trust-model` (a full pickle runs code when loaded: only for files you trust).
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _class_name(path: str) -> str:
    module, name = path.split(":")
    return f"`{name}` ({module.rsplit('.', 1)[-1] if module.startswith('transformers.models') else module})"


def _rows(infos: list[ConverterInfo]) -> list[str]:
    key = sorted(infos, key=lambda i: (i.architecture.lower(), i.source_class))
    return [f"| {_cell(i.architecture)} | {_class_name(i.source_class)} | {i.family or '—'} | {_cell(i.becomes)} | "
            f"{_cell(i.notes)} |" for i in key]


def markdown() -> str:
    """The full text of ``docs/models.md``."""
    infos = list(converters().values())
    covered = [i for i in infos if i.converter is not None]
    refused = sorted((i for i in infos if i.converter is None), key=lambda i: i.architecture.lower())
    lines = [_INTRO, "## Converted modules", "",
             f"{len(covered)} classes of {len({i.architecture for i in covered})} architectures.", "",
             "| architecture | class | gate family | becomes | notes |", "|---|---|---|---|---|", *_rows(covered), "",
             "## Refused", "",
             "A model holding one of these classes is refused with the reason (nothing is exported without its gate). "
             "Covered blocks are also refused, naming the module, when an instance uses an option edgegate does not "
             "reproduce (grouped top-k that restricts the groups, router soft-capping, experts without a gate "
             "projection, an activation other than SiLU / GELU / ReLU, non-ternary weights in an offline BitNet "
             "layer). A module whose class looks like an MoE block but has no converter is reported (log and "
             "manifest): it exports as plain operators, without a gate.", "",
             "| architecture | class | why |", "|---|---|---|",
             *[f"| {_cell(i.architecture)} | {_class_name(i.source_class)} | {_cell(i.refusal)} |"
               for i in refused], "",
             "## Gate families", "",
             "| class | kind | observed as | what it gates |", "|---|---|---|---|"]
    for cls, family in sorted(families().items(), key=lambda kv: (kv[1].kind, kv[0].__qualname__)):
        if not cls.__module__.startswith("edgegate."):
            continue  # user registrations of this process are not part of the docs
        lines.append(f"| `{cls.__module__}.{cls.__qualname__}` | {family.kind} | {_OBSERVE[family.observe]} | "
                     f"{_cell(family.summary)} |")
    lines += ["", _HOW_TO]
    return "\n".join(lines).rstrip("\n") + "\n"
