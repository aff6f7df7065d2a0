"""A bundle's manifest for people: what was exported, how it was quantized, how faithful it stayed.

Input: a manifest dict (``bundle.read_bundle(...).manifest``). Output: labelled plain-text lines
(``Label        : text``): the quantization scheme, calibration mode and data, coverage, gate fidelity
(each agreement with the rows it was counted over and its 95% interval), re-tuned thresholds, the
fidelity target and what met it, A16 promotions, layers kept in float with their reasons, warnings,
the golden check and the files. ``edgegate inspect BUNDLE`` prints them; ``edgegate export`` ends with
the fidelity part. The raw record stays available as ``inspect --json``.

Standard library only (a device inspects bundles with numpy + onnxruntime installed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from edgegate.reports.text import labelled, num, pack, size
from edgegate.schemes import QuantScheme

__all__ = ["bundle_lines", "ci", "fidelity_lines", "gate_label", "golden_lines", "precision_lines", "quant_lines",
           "search_lines"]

EXIT_FORMS = {"compact": "batch compaction", "if": "nested ONNX If"}
# Fidelity metrics of one gate (calibration/fidelity.py), in the order and words shown.
GATE_METRICS = (
    ("exit_agreement", "exit agreement"),
    ("topk_set_agreement", "top-k set agreement"),
    ("top1_expert_agreement", "top-1 expert agreement"),
    ("mask_hamming", "mask Hamming distance"),
    ("gate_mae", "gate mean |error|"),
    ("count_agreement", "learner-count agreement"),
)
GATE_WORDS = {**dict(GATE_METRICS), "top1_agreement": "top-1 agreement"}


def gate_label(gate: Mapping[str, Any] | None, name: str = "") -> str:
    """A gate's module path; a model-level gate (path ``""``) is shown by its class."""
    name = (gate or {}).get("name", name)
    if name:
        return str(name)
    return f"{(gate or {}).get('module') or 'model'} (whole model)"


def bundle_lines(m: Mapping[str, Any]) -> list[str]:
    """The whole summary of a bundle: source, export, quantization, fidelity, golden check, files."""
    src, export, versions = m.get("source") or {}, m.get("export") or {}, m.get("versions") or {}
    model_class = str((m.get("model") or {}).get("class") or "?").rpartition(":")[2]
    lines = labelled("Model", [f"{model_class} from {src.get('file', '?')} ({src.get('format', '?')}, "
                               f"sha256 {str(src.get('sha256', '?'))[:12]}...)"])
    if export:
        ins = export.get("inputs") or [export.get("input") or {}]  # "input" alone: bundles before several inputs
        shown = ", ".join(f"{i.get('name')} {i.get('dtype')} {i.get('shape')}" for i in ins)
        batch = export.get("batch") or "dynamic"
        text = (f"input{'s' if len(ins) > 1 else ''} {shown}, batch {batch}; outputs "
                f"{', '.join(export.get('outputs') or []) or '-'}; opset {export.get('opset')}")
        if export.get("exit_form"):
            form = EXIT_FORMS.get(export["exit_form"], export["exit_form"])
            text += f"; early exit by {form}"
        if export.get("functions"):
            text += f"; edgegate ops {', '.join(export['functions'])}"
        lines += labelled("Export", [text])
    if versions or m.get("created"):
        made = ", ".join(f"{k} {v}" for k, v in versions.items())
        lines += labelled("Created", [f"{m.get('created', '?')} with {made}"])
    options = [f"{k} {_detail(v)}" for k, v in (m.get("target_options") or {}).items()
               if not isinstance(v, (Mapping, list))]  # records (trt's build) are for --json
    lines += labelled("Target", pack([f"{m.get('target')}: {options[0]}", *options[1:]] if options
                                     else [str(m.get("target"))]))
    lines += quant_lines(m)
    lines += golden_lines(m)
    files = {k: v.get("bytes", 0) if isinstance(v, Mapping) else v for k, v in (m.get("files") or {}).items()}
    if files:
        shown = [f"{k} {size(v)}" for k, v in sorted(files.items(), key=lambda kv: -kv[1])]
        lines += labelled("Files", pack([*shown[:-1], shown[-1] + f"; total {size(sum(files.values()))}"]))
    return lines


def quant_lines(m: Mapping[str, Any]) -> list[str]:
    """Scheme and calibration, coverage, fidelity, thresholds and what was kept in higher precision, then
    MoE expert skipping when the export calibrated it."""
    return [*_scheme_lines(m), *skip_lines(m)]


def skip_lines(m: Mapping[str, Any]) -> list[str]:
    """MoDES expert skipping (manifest ``moe_skip``): tau, alpha per router, skip rate and metric."""
    s = m.get("moe_skip") or {}
    if not s:
        return []
    budget = s.get("budget") or 0
    unit = f"{budget * 100:g} % of loss" if s.get("metric") == "lm_loss" else f"{budget * 100:g} pt"
    alphas = ", ".join(f"{p or 'model'} {num(a)}" for p, a in (s.get("importance") or {}).items())
    parts = [f"{s.get('mode')}, tau {num(s.get('tau'))} (alpha: {alphas}; budget {unit})"]
    for rows in ("calibration", "held_out"):
        r = s.get(rows) or {}
        if r:
            parts.append(f"{rows.replace('_', '-')} rows: {_fractions(r.get('skip_rate'))} of routed slots skipped, "
                         f"{s.get('metric')} {_fixed(r.get('unskipped'))} -> {_fixed(r.get('skipped'))}")
    return labelled("MoE skip", parts)


def _scheme_lines(m: Mapping[str, Any]) -> list[str]:
    q = m.get("quant") or {}
    scheme = q.get("scheme") or "fp32"
    if scheme == QuantScheme.INT8:
        return [*_int8_lines(q, _gates_by_name(m)), *fidelity_lines(m), *precision_lines(m)]
    if scheme == QuantScheme.TERNARY:
        layers = q.get("layers") or {}
        rank = q.get("lowrank") or 0
        text = (f"ternary {{-1, 0, +1}} x scale, {num(q.get('bits_per_weight'))} bits/weight packed, "
                f"{len(layers)} layers" + (f", rank-{rank} float low-rank correction" if rank else ""))
        data = q.get("calibration_data")
        return labelled("Quantization", [text + (f"; fitted on {data}" if data else "")]) + precision_lines(m)
    precision = "fp16 (the target builds in half precision)" if (m.get("target_options") or {}).get("fp16") \
        else scheme
    compiled = set(m.get("files") or {}) - {"model.onnx", "golden_io.npz"}  # an engine, a core image, ...
    return labelled("Quantization", [f"none: an {precision} graph" + (" (the target compiles it further: see Target)"
                                                                    if compiled else "")])


def _gates_by_name(m: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {g.get("name"): g for g in (m.get("gates") or {}).get("gates", [])}


def _int8_lines(q: Mapping[str, Any], gates: Mapping[str, Mapping[str, Any]]) -> list[str]:
    config = q.get("config") or {}
    mode = "gate-aware" if config.get("calibration") == "gate_aware" else str(config.get("calibration", "?"))
    kept = "kept float" if config.get("gate_precision") == "float" else f"in {config.get('gate_precision', '?')}"
    text = (f"int8 ({config.get('qdq_form', '?')} form), {mode} calibration on {q.get('calibration_data') or '?'} "
            f"({q.get('samples', '?')} samples{_split_words(q.get('data_split'))}), observer "
            f"{config.get('observer', '?')}, gate layers {kept}")
    lines = labelled("Quantization", [text])
    coverage = q.get("calibrated") or q.get("coverage") or {}
    cov: list[str] = []
    for path, rows in (coverage.get("stages") or {}).items():
        cov.append(f"rows per stage of {gate_label(gates.get(path), path)}: {' / '.join(str(r) for r in rows)}")
    for path, rows in (coverage.get("slots") or {}).items():
        cov.append(f"rows per expert of {gate_label(gates.get(path), path)}: {' / '.join(str(r) for r in rows)}")
    for path, rows in (coverage.get("learners") or {}).items():
        cov.append(f"rows per learner of {gate_label(gates.get(path), path)}: {' / '.join(str(r) for r in rows)}")
    layer_rows = coverage.get("layers") or {}
    if layer_rows:
        least = min(layer_rows, key=layer_rows.get)
        cov.append(f"fewest rows {layer_rows[least]} ({least}; minimum {config.get('min_coverage', '?')})")
    augmented = [f"{gate_label(gates.get(a.get('gate', '')), a.get('gate', ''))} {a.get('kind')} "
                 f"{num(a.get('before'))} -> {num(a.get('after'))} ({a.get('rows_before')} -> {a.get('rows_after')} "
                 "rows)" for a in q.get("augmentation") or []]
    cov.append("augmented for calibration: " + ("; ".join(augmented) if augmented else "no"))
    for f in q.get("fallbacks") or []:
        cov.append(f"{f.get('layer')}: {f.get('action')} fallback ({f.get('reason')})")
    return lines + labelled("Coverage", cov)


def _split_words(split: Mapping[str, Any] | None) -> str:
    """``: train 424 + val 600; held out 2976: test 600 + train 2376`` from ``quant.data_split`` (a built-in
    dataset's calibration rows and held-out rows by split), or nothing."""
    if not split:
        return ""

    def rows(part: Mapping[str, Any]) -> str:
        return " + ".join(f"{name} {n}" for name, n in (part.get("splits") or {}).items())

    held = split.get("held_out") or {}
    return f": {rows(split.get('calibration') or {})}; held out {held.get('rows', '?')}: {rows(held)}"


def fidelity_lines(m: Mapping[str, Any]) -> list[str]:
    """Float vs quantized on held-out data, or the calibration rows without --holdout (manifest
    ``quant.fidelity``), per gate, and re-tuned thresholds."""
    q = m.get("quant") or {}
    fid = q.get("fidelity") or {}
    if not fid:
        return labelled("Fidelity", ["not measured (no held-out data: calibration came from a user file)"]) \
            if q.get("scheme") == "int8" else []
    intervals = fid.get("intervals") or {}
    parts = [f"top-1 agreement {_fixed(fid.get('top1_agreement'))}{ci(intervals.get('top1_agreement'))}"]
    if fid.get("output_sqnr_db") is not None:
        parts.append(f"output SQNR {fid['output_sqnr_db']:.1f} dB")
    for key in ("accuracy", "loss"):
        if isinstance(fid.get(key), Mapping):
            parts.append(f"{key} {_fixed(fid[key].get('float'))} -> {_fixed(fid[key].get('quant'))}")
    rows = "calibration" if fid.get("measured_on") == "calibration" else "held-out"  # no --holdout: calibration
    where = f"float -> quantized, {fid.get('samples', '?')} {rows} samples"
    if fid.get("trained_rows"):
        where += f" ({fid['trained_rows']} of them trained on: agreement only)"
    scored = (fid.get("accuracy") or {}).get("samples") if isinstance(fid.get("accuracy"), Mapping) else None
    if scored and scored != fid.get("samples"):
        where += f"; accuracy and loss on the {scored} unseen ones"
    lines = labelled("Fidelity", pack([*parts[:-1], f"{parts[-1]} ({where})"]))
    by_name = _gates_by_name(m)
    per_gate = []
    for name, g in (fid.get("gates") or {}).items():
        # The built-in kinds' metrics in their words; a user kind's rates (those with an interval) by their key.
        rates = g.get("intervals") or {}
        metrics = [*GATE_METRICS, *((k, k.replace("_", " ")) for k in rates if k not in GATE_WORDS)]
        shown = [f"{words} {_fixed(g[key])}{ci(rates.get(key))}" for key, words in metrics if key in g]
        if g.get("rows") is not None and shown:
            shown[-1] += f" over {g['rows']} rows"
        if g.get("aligned") is False:
            shown.append("not comparable (rows differ between float and quantized)")
        fractions = g.get("exit_fractions") or g.get("open_fraction")
        if isinstance(fractions, Mapping) and fractions:
            what = "exits" if "exit_fractions" in g else "open"
            shown.append(f"{what} float {_fractions(fractions.get('float'))}, "
                         f"quant {_fractions(fractions.get('quant'))}")
        if isinstance(g.get("mean_count"), Mapping):
            shown.append(f"mean learners float {_fixed(g['mean_count'].get('float'))}, "
                         f"quant {_fixed(g['mean_count'].get('quant'))}")
        per_gate.append(f"{gate_label(by_name.get(name), name)}: {', '.join(shown) or '-'}")
    lines += labelled("Gate fidelity", per_gate)
    thresholds = [f"{gate_label(by_name.get(p), p)}: {_floats(t.get('before'))} -> {_floats(t.get('after'))}"
                  for p, t in (q.get("thresholds") or {}).items() if isinstance(t, Mapping)]
    return lines + labelled("Thresholds", [f"re-tuned exit thresholds {t}" for t in thresholds])


def ci(interval: Mapping[str, Any] | None) -> str:
    """`` [low, high]``: a Wilson 95% interval as recorded (``edgegate.metrics``), or nothing."""
    if not isinstance(interval, Mapping) or interval.get("low") is None:
        return ""
    return f" [{interval['low']:.4f}, {interval['high']:.4f}]"


def search_lines(q: Mapping[str, Any]) -> list[str]:
    """The fidelity target, the means that met it (or the best try), and how many tries it took."""
    search = q.get("search") or {}
    if not search:
        return []
    tries = search.get("tries") or []
    chosen = search.get("chosen") or {}
    index = chosen.get("try", len(tries) - 1)
    picked = tries[index] if 0 <= index < len(tries) else {}
    how = [f"observer {chosen.get('observer')}"]
    how += [w for k, w in (("retune_thresholds", "re-tuned thresholds"), ("bias_correction", "bias correction"))
            if chosen.get(k)]
    how += [f"{w} {', '.join(chosen[k])}" for k, w in (("a16_layers", "A16W8"), ("float_layers", "float"))
            if chosen.get(k)]
    verdict = "met" if search.get("met") else "NOT met"
    measured = [f"{GATE_WORDS.get(e['metric'], e['metric'])} {_fixed(e.get('value'))} (expected "
                f"{_fixed(e.get('expected'))} +- {_fixed(e.get('se'))})" for e in picked.get("measured") or []
                if e.get("metric") in (search.get("metrics") or [])]
    text = (f"{num(search.get('target'))} {verdict} by try {index + 1} of {len(tries)} "
            f"({picked.get('means', '?')}: {', '.join(how)}); on {search.get('rows', '?')} calibration rows "
            + ", ".join(measured))
    return labelled("Target", pack([text], width=10_000))


def precision_lines(m: Mapping[str, Any]) -> list[str]:
    """The fidelity target's choice, what stayed in higher precision (A16W8 promotions and float layers,
    each with its reason) and the warnings."""
    q = m.get("quant") or {}
    lines: list[str] = search_lines(q)
    a16 = q.get("a16") or {}
    if a16.get("layers"):
        how = ("promoted for gate fidelity, run in float (TensorRT has no int16 activations)"
               if (q.get("config") or {}).get("qdq_form") == "symmetric" else "16-bit activations, int8 weights")
        lines += labelled("A16 layers", [f"{', '.join(a16['layers'])}: {how} (target {num(a16.get('target'))})"])
    reasons = q.get("float_layers") or q.get("kept_float_reasons") or {}
    if isinstance(reasons, Mapping) and reasons:
        lines += labelled("Kept float", pack(f"{k} ({v})" for k, v in reasons.items()))
    elif q.get("kept_float"):
        lines += labelled("Kept float", pack(q["kept_float"]))
    calibrated = q.get("scheme") in (QuantScheme.INT8, QuantScheme.TERNARY)
    if calibrated and not any(line.startswith("Kept float") for line in lines):
        lines += labelled("Kept float", ["none"])
    return lines + labelled("Warnings", list(q.get("warnings") or []))


def golden_lines(m: Mapping[str, Any]) -> list[str]:
    """The export's own check: the compiled model vs torch on the golden samples, and bench's tolerance."""
    g = m.get("golden") or {}
    if not g:
        return []
    vs = g.get("vs_torch") or {}
    errs = [f"{k.removesuffix('_max_abs_err')} {num(v, 3)}" for k, v in vs.items() if k.endswith("_max_abs_err")]
    agree = [f"{k.removesuffix('_agreement')} {_fixed(v)}" for k, v in vs.items() if k.endswith("_agreement")]
    text = (f"{g.get('samples', '?')} samples run on {g.get('source', '?')} vs torch: max |err| "
            f"{', '.join(errs) or '-'}")
    if agree:
        text += f"; agreement {', '.join(agree)}"
    return labelled("Golden", [text + f"; bench allows atol {num(g.get('atol'), 3)}"])


def _fixed(v: object) -> str:
    """Agreements, accuracies, losses: four decimals, so columns of them line up by eye."""
    return f"{v:.4f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else num(v)


def _detail(v: object) -> str:
    return num(v) if not isinstance(v, bool) else str(v).lower()


def _floats(values: Sequence[float] | None) -> str:
    return "[" + ", ".join(num(v) for v in values or []) + "]"


def _fractions(values: Sequence[float] | float | None) -> str:
    if isinstance(values, (int, float)):
        return f"{values:.1%}"
    return "/".join(f"{v:.1%}" for v in values or []) or "-"
