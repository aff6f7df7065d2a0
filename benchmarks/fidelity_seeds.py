"""Section 6, gate fidelity over seeds: each gated zoo family retrained with seeds 0-4, int8 gate-aware vs naive.

Per family and seed: the zoo recipe trains the model (seed 0 is the run's shared checkpoint; each model is
trained once per run), then the int8 quantize step of ``edgegate export --target cpu --quant int8`` runs
three times on the export's calibration rows (``val`` plus a seeded pick of ``train``: 897 digits rows,
1 024 clusters rows; ``data.split_data``): gate-aware with the default fidelity target (the search), naive
(the gate-unaware baseline), and plain INT8 (gate-aware, target 0: one calibration, every feeding layer
8-bit). Agreements are measured on every held-out row (the test split, then the rest of train: 900 digits
rows, 2 976 clusters rows; agreement compares quantized with float, so rows the model was trained on
measure it as well), accuracy on the test split only. Per family: mean / min / max over seeds of every agreement and
of the accuracy change (points, quantized - float), gate-aware and naive side by side, and whether
gate-aware is at least as good as naive on every seed (gate metrics and accuracy). Accuracy differences of one
or two test samples are also shown paired: per seed, the test rows each quantized model gets right that float
gets wrong (gained) and the reverse (lost), and the exact one-sided McNemar p-value that gate-aware is less
accurate than naive (from the test rows on which exactly one of the two is right).

The cost of the fidelity: the chosen precision mix's ``model.onnx`` vs plain INT8's on ONNX Runtime
(1 thread, batch 1, held-out rows in turn; interleaved, ``harness``); ratio = chosen / plain median ms
(> 1: the mix is slower). Where the search chose plain INT8 the graphs are the same and are not timed.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np

from benchmarks.harness import Sizes, batches, cycling, goal, ort_session, time_interleaved
from benchmarks.workspace import Workspace

FULL_FAMILIES = ("early_exit", "moe", "moe_pp", "channel_gate", "threshold_gate", "gated_attention", "acm")
SMOKE_FAMILIES = ("early_exit",)  # the family that needs the whole ladder; its seed-0 checkpoint is shared
FULL_SEEDS, SMOKE_SEEDS = (0, 1, 2, 3, 4), (0,)
TARGET = 0.995
MAX_ACCURACY_DROP = 0.005  # half a point
GATE_METRICS = ("exit_agreement", "topk_set_agreement", "top1_expert_agreement", "count_agreement", "mask_hamming")
METRICS = (*GATE_METRICS, "top1_agreement", "gate_mae", "accuracy_change")
LOWER_IS_BETTER = ("mask_hamming", "gate_mae")


def _model(ws: Workspace, name: str, seed: int, cache: dict) -> Any:
    """The trained model of ``name`` at ``seed``: seed 0 from the run's checkpoint, others trained here, once."""
    if (name, seed) not in cache:
        if seed == 0:
            from edgegate.loading import load

            cache[name, seed] = load(ws.checkpoint(name)).module.eval()
        else:
            from edgegate import zoo

            cache[name, seed] = zoo.train(name, seed)[0]
    return cache[name, seed]


def _quantize(model: Any, name: str, *, onnx: bool = True, **options: Any) -> tuple[Any, bytes | None, Any]:
    """(quant record, lowered model.onnx or None, whether each test row is predicted right [test rows]) of the int8
    quantize step, as ``export --target cpu`` runs it."""
    import torch

    from edgegate import zoo
    from edgegate.data import TensorSpec, split_data
    from edgegate.gates import find_gates
    from edgegate.onnx_export.torch_export import ExportOptions, export_onnx
    from edgegate.quantization.plan import QdqForm
    from edgegate.quantization.step import QuantOptions, quantize_for_export

    entry = zoo.entry(name)
    spec = TensorSpec(entry.inputs[0].name, tuple(entry.inputs[0].shape), entry.inputs[0].dtype)
    calib, held = split_data(entry.load_data())
    q = quantize_for_export(model, find_gates(model), QuantOptions(scheme="int8", **options), QdqForm.ASYMMETRIC, calib,
                            held, spec)
    right = _right(q.reference, held.split("test"), spec.dtype)
    if not onnx:
        return q.record, None, right
    x = torch.from_numpy(np.ascontiguousarray(held.input()[:2].astype(spec.dtype)))
    proto = q.lower(export_onnx(q.export_model, x, spec.name, ExportOptions()))
    return q.record, proto.SerializeToString(), right


def _right(model: Any, test: Any, dtype: str) -> np.ndarray:
    """Whether ``model`` predicts each row of ``test`` right (the first output's argmax vs the labels)."""
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(test.input().astype(dtype))))
    logits = out[0] if isinstance(out, tuple) else out
    return logits.argmax(-1).numpy() == test.labels


def _paired(right: np.ndarray, reference: np.ndarray) -> dict[str, int]:
    """Test rows ``right`` gets right and ``reference`` wrong (gained), and the reverse (lost)."""
    return {"gained": int((right & ~reference).sum()), "lost": int((~right & reference).sum())}


def _mcnemar_worse(aware: np.ndarray, naive: np.ndarray) -> float:
    """Exact one-sided McNemar p-value that gate-aware is less accurate than naive: P(X >= c), X ~ Bin(b + c, 1/2),
    where c = test rows only naive gets right and b = rows only gate-aware gets right (1.0: no evidence)."""
    c, b = int((naive & ~aware).sum()), int((aware & ~naive).sum())
    n = b + c
    return float(sum(math.comb(n, i) for i in range(c, n + 1)) / 2 ** n) if n else 1.0


def _metrics(record: dict[str, Any]) -> dict[str, float]:
    fid = record["fidelity"]
    out = {k: v for k, v in fid["summary"].items() if k in METRICS}
    out["top1_agreement"] = fid["top1_agreement"]
    out["accuracy_change"] = fid["accuracy"]["quant"] - fid["accuracy"]["float"]
    return out


def _held_out(name: str) -> Any:
    from edgegate import zoo
    from edgegate.data import split_data

    return split_data(zoo.entry(name).load_data())[1]


def _dtype(name: str) -> str:
    from edgegate import zoo

    return zoo.entry(name).inputs[0].dtype


def _latency(name: str, chosen: bytes, plain: bytes, sizes: Sizes) -> dict[str, Any]:
    from edgegate import zoo

    entry = zoo.entry(name)
    held = _held_out(name).input().astype(entry.inputs[0].dtype)
    feeds = batches(held, 1, count=64)
    runs = {}
    for label, model in (("chosen", chosen), ("plain_int8", plain)):
        session = ort_session(model, 1)
        runs[label] = cycling(lambda x, s=session: s.run(None, {entry.inputs[0].name: x}), feeds)
    t = time_interleaved(runs, sizes)
    return {"chosen_ms": t["chosen"].median_ms, "plain_int8_ms": t["plain_int8"].median_ms,
            "ratio": round(t["chosen"].median_ms / t["plain_int8"].median_ms, 3),
            "timings": {k: v.to_dict() for k, v in t.items()}}


def _seed_row(ws: Workspace, name: str, seed: int, sizes: Sizes, cache: dict) -> dict[str, Any]:
    model = _model(ws, name, seed, cache)
    aware, aware_onnx, aware_right = _quantize(model, name)
    naive, _, naive_right = _quantize(model, name, onnx=False, calibration="naive")
    float_right = _right(model, _held_out(name).split("test"), _dtype(name))
    search = aware["search"] or {}
    chosen = search.get("chosen") or {}
    promoted = [*chosen.get("a16_layers", []), *chosen.get("float_layers", [])]
    row = {"family": name, "seed": seed, "gate_aware": _metrics(aware), "naive": _metrics(naive),
           "held_out_rows": aware["fidelity"]["samples"], "accuracy_rows": aware["fidelity"]["accuracy"]["samples"],
           "intervals": {k: v for k, v in aware["fidelity"]["intervals"].items() if k in GATE_METRICS},
           "met": search.get("met"), "tries": len(search.get("tries", [])), "means": chosen.get("means"),
           "a16_layers": chosen.get("a16_layers", []), "float_layers": chosen.get("float_layers", []),
           "observer": chosen.get("observer"), "warnings": aware["warnings"],
           "test_rows_vs_float": {"gate_aware": _paired(aware_right, float_right),
                                  "naive": _paired(naive_right, float_right)},
           "mcnemar_p_gate_aware_worse": round(_mcnemar_worse(aware_right, naive_right), 4)}
    if promoted:
        plain, plain_onnx, _ = _quantize(model, name, fidelity_target=0)
        row["plain_int8"] = _metrics(plain)
        row["latency"] = _latency(name, aware_onnx, plain_onnx, sizes)
    else:  # the search kept plain INT8: the same graph, nothing to time
        row["plain_int8"] = row["gate_aware"]
        row["latency"] = {"ratio": 1.0, "note": "plain INT8 chosen: same graph"}
    return row


def _better_or_equal(metric: str, a: float, b: float) -> bool:
    return a <= b if metric in LOWER_IS_BETTER else a >= b


def _summary(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for metric in METRICS:
        side = {}
        for mode in ("gate_aware", "naive", "plain_int8"):
            values = [r[mode][metric] for r in rows if metric in r[mode]]
            if values:
                side[mode] = {"mean": round(statistics.fmean(values), 5), "min": round(min(values), 5),
                              "max": round(max(values), 5)}
        if side:
            seeds_ok = [_better_or_equal(metric, r["gate_aware"][metric], r["naive"][metric]) for r in rows
                        if metric in r["gate_aware"] and metric in r["naive"]]
            stats[metric] = {**side, "gate_aware_ge_naive_seeds": sum(seeds_ok), "seeds": len(seeds_ok)}
    ratios = [r["latency"]["ratio"] for r in rows]
    return {"family": name, "seeds": [r["seed"] for r in rows], "metrics": stats,
            "latency_ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}}


def _goals(summary: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    name, stats = summary["family"], summary["metrics"]
    out = []
    gates = [m for m in GATE_METRICS if m in stats]
    if gates:
        worst = min(1 - stats[m]["gate_aware"]["max"] if m == "mask_hamming" else stats[m]["gate_aware"]["min"]
                    for m in gates)
        out.append(goal(f"{name}: every seed, every gate agreement >= {TARGET} (1 - mask Hamming)",
                        f">= {TARGET}", round(worst, 5), worst >= TARGET, ", ".join(gates)))
    drop = -stats["accuracy_change"]["gate_aware"]["min"]
    out.append(goal(f"{name}: every seed, accuracy within 0.5 pt of float", "<= 0.5 pt", round(100 * drop, 3),
                    drop <= MAX_ACCURACY_DROP + 1e-9, "points lost on the test split, worst seed"))
    compared = [*gates, "accuracy_change"]
    ok = min((stats[m]["gate_aware_ge_naive_seeds"] for m in compared), default=0)
    out.append(goal(f"{name}: gate-aware >= naive on every seed", f"{len(rows)} / {len(rows)} seeds", ok,
                    ok == len(rows), ", ".join(compared)))
    worst_p = min(r["mcnemar_p_gate_aware_worse"] for r in rows)
    out.append(goal(f"{name}: gate-aware not significantly less accurate than naive, every seed (paired)",
                    "McNemar p >= 0.05", worst_p, worst_p >= 0.05,
                    "exact one-sided, test rows where one of the two is right; smallest p over seeds"))
    return out


def run(ws: Workspace, sizes: Sizes) -> dict[str, Any]:
    families = SMOKE_FAMILIES if sizes.smoke else FULL_FAMILIES
    seeds = SMOKE_SEEDS if sizes.smoke else FULL_SEEDS
    cache: dict = {}
    rows, errors, summaries, goals = [], [], [], []
    for name in families:
        done = []
        for seed in seeds:
            try:
                done.append(_seed_row(ws, name, seed, sizes, cache))
            except Exception as e:  # a seed that fails is reported; the others still run
                errors.append({"model": name, "form": f"seed {seed}",
                               "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"})
        rows += done
        if done:
            summaries.append(_summary(name, done))
            goals += _goals(summaries[-1], done)
    ratios = [r["latency"]["ratio"] for r in rows]
    return {"method": __doc__.split("\n\n", 1)[1].strip(), "target": TARGET, "families": list(families),
            "seeds": list(seeds), "rows": rows, "summary": summaries, "errors": errors, "goals": goals,
            "latency_ratio_median": statistics.median(ratios) if ratios else None}


def render(s: dict[str, Any], table: Any) -> list[str]:
    """Markdown for ``benchmarks.report``: the seed table (mean / min / max, gate-aware | naive), then per seed."""
    lines = [f"Target {s['target']}; seeds {', '.join(map(str, s['seeds']))}; agreements on every held-out row, "
             "accuracy change (quantized - float, points) on the test split. Cells: mean [min, max].", ""]

    def cell(d: dict[str, float] | None, scale: float = 1.0) -> str:
        if not d:
            return "–"
        return f"{scale * d['mean']:.4f} [{scale * d['min']:.4f}, {scale * d['max']:.4f}]"

    rows = []
    for summary in s["summary"]:
        for metric, st in summary["metrics"].items():
            scale = 100.0 if metric == "accuracy_change" else 1.0
            rows.append([summary["family"], metric, cell(st.get("gate_aware"), scale), cell(st.get("naive"), scale),
                         cell(st.get("plain_int8"), scale),
                         f"{st['gate_aware_ge_naive_seeds']}/{st['seeds']}"])
    lines += table(["family", "metric", "gate-aware", "naive", "plain INT8 (no search)", "gate-aware ≥ naive"],
                   rows)
    def flips(d: dict[str, int]) -> str:
        return f"+{d['gained']} −{d['lost']}"

    per_seed = [[r["family"], r["seed"], r["met"], r["tries"], r["means"], r["observer"],
                 ", ".join(r["a16_layers"]) or "–", ", ".join(r["float_layers"]) or "–", r["latency"]["ratio"],
                 r["held_out_rows"], flips(r["test_rows_vs_float"]["gate_aware"]),
                 flips(r["test_rows_vs_float"]["naive"]), r["mcnemar_p_gate_aware_worse"]] for r in s["rows"]]
    lines += table(["family", "seed", "target met", "tries", "chosen means", "observer", "A16W8", "float",
                    "latency × plain INT8", "held-out rows", "test rows vs float: gate-aware", "naive",
                    "McNemar p (gate-aware worse)"], per_seed)
    lines += [f"Median latency ratio of the chosen precision mix vs plain INT8: {s['latency_ratio_median']}.", ""]
    return lines + [f"- **error** {e['model']} {e['form']}: {e['error']}" for e in s["errors"]]
