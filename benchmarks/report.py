"""The results document -> Markdown: one table per section, then every goal with met / missed."""

from __future__ import annotations

from typing import Any

from benchmarks import fidelity_seeds


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, (list, tuple)):
            return " / ".join(cell(x) for x in v)
        return str(v).replace("|", "\\|")  # a pipe inside a cell would split it

    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return out + [""]


def _errors(section: dict[str, Any]) -> list[str]:
    return [f"- **error** {e.get('model', '')} {e.get('form', '')}: {e['error']}" for e in section.get("errors", [])]


def _cpu_int8(s: dict[str, Any]) -> list[str]:
    lines = [f"_{s['note']}._", ""]
    # A session that crashed ONNX Runtime at that thread count was not timed (harness.crashing).
    rows = [[m["model"], r["threads"], r["batch"],
             *(r.get(f"{k}_ms", "crashed") for k in ("fp32", "edgegate", "ort_static")),
             r["speedup_vs_fp32"], r["speedup_vs_ort_static"], r["ort_static_speedup_vs_fp32"]]
            for m in s["models"] for r in m["latency"]]
    lines += _table(["model", "threads", "batch", "FP32 ms", "edgegate ms", "quantize_static ms",
                     "edgegate ×FP32", "edgegate ×qs", "qs ×FP32"], rows)
    lines += list(dict.fromkeys(f"- {m['model']}: {k} not timed: {why}" for m in s["models"] for r in m["latency"]
                                for k, why in (r.get("crashed") or {}).items()))
    rows = []
    for m in s["models"]:
        q = m["quality"]
        rows.append([m["model"], *(q[k].get("accuracy") for k in ("fp32", "edgegate", "ort_static")),
                     q["edgegate"]["top1_agreement"], q["ort_static"]["top1_agreement"],
                     q["edgegate"]["gate_agreement"], q["ort_static"]["gate_agreement"],
                     ", ".join(f"{k} {v}/{q['ort_static']['gates'].get(k)}" for k, v in q["edgegate"]["gates"].items())
                     or "–"])
    lines += _table(["model", "acc FP32", "acc edgegate", "acc qs", "top-1 agr. edgegate", "top-1 agr. qs",
                     "gate agr. edgegate", "gate agr. qs", "per gate (edgegate/qs)"], rows)
    return lines + _errors(s)


def _real_size(s: dict[str, Any]) -> list[str]:
    if not s["models"]:  # only gated rows were asked for (EDGEGATE_BENCH_REAL_SIZE)
        return _real_size_gated(s.get("gated") or []) + _errors(s)
    rows = [[m["model"], r["threads"], r["batch"], r["fp32_ms"], r["edgegate_ms"], r["ort_static_ms"],
             r["speedup_vs_fp32"], r["speedup_vs_ort_static"], r["ort_static_speedup_vs_fp32"]]
            for m in s["models"] for r in m["latency"]]
    lines = _table(["model", "threads", "batch", "FP32 ms", "edgegate ms", "quantize_static ms", "edgegate ×FP32",
                    "edgegate ×qs", "qs ×FP32"], rows)
    rows = []
    for m in s["models"]:
        q, e = m["quality"], m["export"]
        la = m.get("latency_aware") or {}
        kept = [r["kept"] for r in la.get("regions", [])]
        rows.append([m["model"], f"{m['parameters']:,}", q["edgegate"]["sqnr_db"], q["ort_static"]["sqnr_db"],
                     q["edgegate"]["top1_agreement"], q["ort_static"]["top1_agreement"], e["fp32"]["wall_s"],
                     e["int8"]["wall_s"], e["fp32"]["peak_rss_mib"], e["int8"]["peak_rss_mib"],
                     f"{kept.count('int8')}/{len(kept)}" if kept else "–"])
    lines += _table(["model", "params", "SQNR dB edgegate", "SQNR dB qs", "top-1 agr. edgegate", "top-1 agr. qs",
                     "export s FP32", "export s INT8", "peak RSS MiB FP32", "peak RSS MiB INT8",
                     "INT8 regions kept"], rows)
    return lines + _real_size_gated(s.get("gated") or []) + _errors(s)


def _real_size_gated(gated: list[dict[str, Any]]) -> list[str]:
    """The early-exit MLP and the Hugging Face Mixtral folder: batch 1, 1 thread, through ``edgegate export``."""
    if not gated:
        return []
    rows = []
    for m in gated:
        r, e = m["latency"], m["export"]
        if m["model"] == "early_exit_mlp":
            q = m["quality"]
            agreement = (f"exit {q['edgegate']['exit_agreement']} (qs {q['ort_static']['exit_agreement']}); "
                         f"SQNR {q['edgegate']['sqnr_db']} (qs {q['ort_static']['sqnr_db']}) dB")
            times = [r["fp32_ms"], r["edgegate_ms"], r["ort_static_ms"], r["speedup_vs_fp32"],
                     r["speedup_vs_ort_static"]]
        else:
            q = m["quality"] or {}
            agreement = (f"top-k set {q.get('topk_set_agreement', '–')}, top-1 expert "
                         f"{q.get('top1_expert_agreement', '–')} ({q.get('measured_on', 'no int8 export')}); "
                         f"{m['bound']}: no speed goal")
            times = [r["fp32_ms"], r.get("int8_ms", "–"), "–", r["int8_speedup_vs_fp32"] or "–", "–"]
        rows.append([m["model"], f"{m['parameters']:,}", *times, agreement,
                     *(e.get(k, {}).get("wall_s", "–") for k in ("fp32", "int8")),
                     *(e.get(k, {}).get("peak_rss_mib") or "–" for k in ("fp32", "int8"))])
        if "edgegate_plain_ms" in r:  # the same model at quantize_static's precision: no fidelity search
            plain = m["quality"]["edgegate_plain"]
            rows.append([f"{m['model']} (--fidelity-target 0)", f"{m['parameters']:,}", r["fp32_ms"],
                         r["edgegate_plain_ms"], r["ort_static_ms"], r["plain_speedup_vs_fp32"],
                         r["plain_speedup_vs_ort_static"],
                         f"exit {plain['exit_agreement']}; SQNR {plain['sqnr_db']} dB",
                         "–", e["int8_plain"]["wall_s"], "–", e["int8_plain"]["peak_rss_mib"] or "–"])
    return _table(["gated model", "params", "FP32 ms", "INT8 ms", "quantize_static ms", "INT8 ×FP32", "INT8 ×qs",
                   "agreement with FP32", "export s FP32", "export s INT8", "peak RSS MiB FP32",
                   "peak RSS MiB INT8"], rows)


def _early_exit(s: dict[str, Any]) -> list[str]:
    rows = [[m["model"], m["form"], m["batch"], m["samples"], m["exit_fractions"], m["cost_ms_per_sample"],
             m["measured_ms_per_sample"], m["ideal_ms_per_sample"], m["measured_over_ideal"],
             m["full_depth_ms_per_sample"], m["speedup_vs_full_depth"]] for m in s["models"]]
    return _table(["model", "form", "batch", "samples", "p_k", "cost_k ms/sample", "measured ms/sample",
                   "ideal ms/sample", "measured/ideal", "full depth ms/sample", "×full depth"], rows) + _errors(s)


def _ternary(s: dict[str, Any]) -> list[str]:
    d, c = s["disk"], s["correctness"]
    n, k = s["shape"]
    lines = [f"{n}×{k}: bundle `model.onnx` {d['bundle_model_onnx_bytes']:,} B = "
             f"**{d['bits_per_weight']} bits/weight** "
             f"(FP32 ONNX {d['fp32_onnx_bytes']:,} B, {d['fp32_bits_per_weight']} bits/weight; "
             f"{d['size_ratio_fp32_over_bundle']}× smaller). Kernel: {s['kernel']}. Max error vs the numpy "
             f"reference: {c['max_err_output_steps']} output steps.", ""]
    rows = [[r["threads"], r["batch"], r["edgegate_ms"], r["ort_fp32_ms"], r["torch_fp32_ms"], r["speedup_vs_ort_fp32"],
             r["speedup_vs_torch_fp32"], r["int8_weight_gb_per_s"]] for r in s["rows"]]
    return lines + _table(["threads", "batch", "edgegate ms", "ORT FP32 ms", "torch FP32 ms", "×ORT FP32",
                           "×torch FP32", "int8 weight GB/s"], rows)


def _snn(s: dict[str, Any]) -> list[str]:
    if s.get("gap"):
        return [f"**Gap:** {s['gap']}", ""]
    rows = [[r["network"], r["timesteps"], r["batch"], r["emulator_ms"], r["snntorch_ms"], r["speedup"],
             r["spikes_equal"], r["spike_mismatch_fraction"]] for r in s["rows"]]
    lines = _table(["network", "timesteps", "batch", "emulator ms", "snnTorch ms", "×snnTorch", "spike trains equal",
                    "mismatch fraction"], rows)
    e = s.get("energy")
    if e:
        rows = [[f"{e['model']} {k}", v["timesteps"], v["early_decision"], v["margin"], v["mean_steps"], v["accuracy"],
                 v["energy_pj_per_sample"], e["ann_energy_pj_per_sample"]]
                for k, v in ((k, e[k]) for k in ("default", "t128_no_early"))]
        lines += _table(["snn setting", "timesteps", "early decision", "margin", "mean steps", "test accuracy",
                         "energy pJ/sample", "int8 ANN pJ/sample"], rows)
    return lines + _errors(s)


def _export_time(s: dict[str, Any]) -> list[str]:
    steps = sorted({k for m in s["models"] for k in m["steps_s"]})
    rows = [[m["model"], m["wall_s"], m["first_s"], m["repeats"], *(m["steps_s"].get(k) for k in steps)]
            for m in s["models"]]
    return _table(["model", "wall s (median)", "first s", "repeats", *steps], rows) + _errors(s)


def _gated_families(s: dict[str, Any]) -> list[str]:
    rows = [[m["family"], m["what"], m["batch"], m["used_fraction"], m["measured_ms"], m["ideal_ms"], m["all_ms"],
             m["measured_over_ideal"], m["all_over_measured"]] for m in s["models"]]
    return _table(["family", "model", "batch", "work used", "measured ms", "ideal ms", "all work ms",
                   "measured/ideal", "×all work"], rows) + _errors(s)


def _moe(s: dict[str, Any]) -> list[str]:
    lines = []
    dec = s.get("decode")
    if dec:
        big, small = max(dec["experts"]), min(dec["experts"])
        rows = [[r["quant"], r[f"e{big}_1_token_ms"], r[f"e{small}_1_token_ms"], r["decode_ratio"],
                 r.get("bare_decode_ratio"), r.get("weight_read_ratio", "-"), r[f"e{big}_64_tokens_ms"],
                 r["bare_64_tokens_ms"], r["bundle_vs_bare"]]
                for r in dec["latency"]]
        lines += _table(["quant", f"E={big} 1 token ms", f"E={small} 1 token ms", "ratio", "bare ORT op ratio",
                         "weight read ratio", f"E={big} 64 tokens ms", "bare ORT op 64 tokens ms", "bundle / bare"],
                        rows)
        lines += _table(["output (64 tokens)", "SQNR dB vs float", "route set agreement"],
                        [[k, v["sqnr_db_vs_float"], v.get("route_set_agreement", "-")]
                         for k, v in dec["quality"].items()])
    mem = s.get("memory")
    if mem:
        lines += [f"MoE LM: {mem['parameters']:,} parameters, FP32 weights {mem['fp32_weight_mib']} MiB.", ""]
        lines += _table(["quant", "export s", "peak RSS MiB", "x FP32 weight bytes", "budget MiB", "model.onnx MiB"],
                        [[r["quant"], r["wall_s"], r["peak_rss_mib"], r["rss_per_weight_byte"], r["budget_mib"],
                          r["model_onnx_mib"]] for r in mem["exports"]])
        lat, qual = mem.get("latency"), mem.get("quality")
        if lat and qual:
            lines += _table(["MoE LM, batch 1", "fp32 ms", "edgegate int8 ms", "quantize_static ms", "int8 vs fp32",
                             "int8 vs quantize_static", "int8 SQNR dB", "static SQNR dB", "int8 top-k set agreement"],
                            [["1 thread", lat["fp32_ms"], lat["int8_ms"], lat["ort_static_ms"],
                              lat["int8_speedup_vs_fp32"], lat["int8_speedup_vs_ort_static"],
                              qual["int8"]["sqnr_db"], qual["ort_static"]["sqnr_db"],
                              qual["int8"].get("topk_set_agreement")]])
    return lines + _errors(s)


_SECTIONS = {"cpu_int8": ("1. CPU INT8, zoo (µs-scale, per-node-overhead bound): edgegate vs ORT FP32 vs ORT "
                          "quantize_static", _cpu_int8),
             "early_exit": ("2. Early exit: measured vs ideal Σ p_k·cost_k", _early_exit),
             "ternary": ("3. Ternary 2-bit linear vs FP32 MatMul", _ternary),
             "snn": ("4. SNN emulator vs snnTorch", _snn),
             "export_time": ("5. Export wall time (int8, incl. calibration)", _export_time),
             "real_size": ("6. Real-size models (CNNs at 224 x 224, a 72M early-exit MLP, a Hugging Face MoE folder): "
                           "edgegate INT8 vs ORT FP32 vs ORT quantize_static",
                           _real_size),
             "fidelity_seeds": ("7. Gate fidelity over seeds: gate-aware vs naive int8",
                                lambda s: fidelity_seeds.render(s, _table)),
             "gated_families": ("8. ACM and MoDES expert skipping: measured vs ideal (unused work removed)",
                                _gated_families),

             "moe": ("9. Sparse MoE on cpu (edgegate.nn MoE vs ORT's MoE/QMoE) and MoE LM export memory", _moe)}


def _load_note(m: dict[str, Any]) -> list[str]:
    """A warning when other processes competed for the cores (load average above the usable CPUs)."""
    loads = (m.get("load_average_1_5_15") or [])[:1] + (m.get("load_average_end") or [])[:1]
    if not loads or max(loads) <= m["cpus_usable"]:
        return []
    return [f"**Measured under load** (1-minute load average up to {max(loads)} on {m['cpus_usable']} usable CPUs): "
            "other processes competed for the cores, so absolute times are inflated and noisy; the interleaved "
            "ratios less so. Re-run on a quiet machine before quoting a number.", ""]


def render(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    flags = ", ".join(f for f, on in m["cpu_flags"].items() if on) or "none of the listed"
    v = m["versions"]
    lines = [f"# edgegate benchmarks ({doc['size']} size)", "",
             f"`{doc['command']}` — {doc['created']}", "",
             f"Machine: {m['cpu_model']}, {m['cpus_usable']} usable of {m['logical_cpus']} logical CPUs; flags: "
             f"{flags}. Load average at start {m.get('load_average_1_5_15')}, end {m.get('load_average_end')}. "
             f"Versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if x) + ".", "",
             *_load_note(m),
             f"Each time: median over {doc['sizes']['repeats']} repeats of the median of up to {doc['sizes']['inner']} "
             "timed calls, peers interleaved in one repeat loop; ratios are ratios of medians (>1: edgegate faster).",
             ""]
    for name, section in doc["sections"].items():
        title, fn = _SECTIONS[name]
        lines += [f"## {title}", ""]
        if section["status"] == "error":
            lines += [f"**Section failed:** {section['error']}", ""]
            continue
        lines += fn(section)
    goals = doc.get("goals", [])
    if goals:
        lines += ["## Goals", ""]
        mark = {True: "met", False: "**missed**", None: "not measured"}
        lines += _table(["section", "goal", "target", "value", "result", "note"],
                        [[g["section"], g["goal"], g["target"], g["value"], mark[g["met"]], g["note"]] for g in goals])
    return "\n".join(lines)
