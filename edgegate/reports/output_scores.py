"""Stage 8, compare: score one model variant's outputs against the float model's (numpy only).

Input: the outputs of a run (``logits``, and where the graph has them ``exit_index``, ``route*``, ``learner*``),
the float model's outputs on the same rows and the labels. Output: the metrics, intervals and histograms of a
`compare_record.Row`: accuracy / loss, agreements and output SQNR vs float, Wilson 95% intervals over the rows each
rate was counted on, decision histograms and threshold-sweep points.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edgegate import metrics
from edgegate.data import UNSCORED


def logits_of(out: Mapping[str, np.ndarray]) -> np.ndarray:
    """The ``logits`` output, else the first one (a target may name its outputs its own way)."""
    return out["logits"] if "logits" in out else next(iter(out.values()))


def task_metrics(logits: np.ndarray, labels: np.ndarray | None) -> dict[str, float | None]:
    """Accuracy and loss: labels [N] of logits [N, C], or per-token targets [N, T] of logits [N, T, V]
    (`UNSCORED` positions left out)."""
    if labels is None or labels.ndim != logits.ndim - 1 or labels.shape != logits.shape[:-1]:
        return {}
    scored = labels != UNSCORED
    if not scored.any():
        return {}
    logits, labels = logits[scored], labels[scored]  # flattened to [scored, C]
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    y = labels.astype(np.int64)
    return {"accuracy": float((logits.argmax(1) == y).mean()), "loss": float(-logp[np.arange(len(y)), y].mean())}


def agreement(f: dict[str, np.ndarray], q: dict[str, np.ndarray]) -> dict[str, float | None]:
    """Bundle vs float on the outputs both have: logits, exit index, route indices."""
    fl, ql = logits_of(f), logits_of(q)
    out: dict[str, float | None] = {
        "top1_agreement": metrics.top1_agreement(fl, ql),
        "output_sqnr_db": metrics.sqnr_db(fl, ql),
    }
    if "exit_index" in f and "exit_index" in q:
        out["exit_agreement"] = metrics.decision_agreement(f["exit_index"], q["exit_index"])
        out["mean_exit_depth"] = float(q["exit_index"].mean() + 1)
    r = next((k for k in f if k.startswith("route")), None)
    if r and r in q and f[r].shape == q[r].shape:  # a skipped slot is -1 in both: set agreement counts skips
        out["topk_set_agreement"] = metrics.topk_set_agreement(f[r], q[r])
        out["top1_expert_agreement"] = metrics.top1_expert_agreement(f[r], q[r])
    c = next((k for k in f if k.startswith("learner")), None)
    if c and c in q and f[c].shape == q[c].shape:
        out["count_agreement"] = metrics.decision_agreement(f[c], q[c])
    return out


def gate_outputs(out: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean learners per token (an ACM's ``learner_count`` output) and the skipped-slot rate of the route
    output (-1 marks a slot the router skipped)."""
    got: dict[str, float] = {}
    c = next((k for k in out if k.startswith("learner")), None)
    if c is not None and out[c].size:
        got["mean_learners"] = float(out[c].mean())
    r = next((k for k in out if k.startswith("route")), None)
    if r is not None and out[r].size:
        got["skip_rate"] = float((out[r] < 0).mean())
    return got


def rate_intervals(scores: Mapping[str, float | None], f: dict[str, np.ndarray]) -> dict[str, dict[str, float | int]]:
    """Wilson 95% interval of each rate in ``scores`` over the rows it was counted on: samples, or routed
    tokens (every leading dim of the route output) for the expert agreements and for a causal LM's logits, tokens
    (every element of the learner-count output) for the learner-count agreement."""
    logits = logits_of(f)
    samples = int(logits.size // logits.shape[-1])  # a causal LM's logits decide per token
    r = next((k for k in f if k.startswith("route")), None)
    tokens = metrics.routed_rows(f[r]) if r else samples
    c = next((k for k in f if k.startswith("learner")), None)
    rows = {"accuracy": samples, "top1_agreement": samples, "exit_agreement": samples,
            "topk_set_agreement": tokens, "top1_expert_agreement": tokens,
            "count_agreement": int(f[c].size) if c else samples}
    return {m: metrics.wilson(scores[m], n).to_dict() for m, n in rows.items() if scores.get(m) is not None}


def histograms(out: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """Fractions of samples per exit or learner count, and of routed slots per expert (skipped slots left out)."""
    hists = {}
    for k, v in out.items():
        if k == "exit_index" or k.startswith(("route", "learner")):
            values = v.reshape(-1).astype(np.int64)
            counts = np.bincount(values[values >= 0])
            hists[k] = (counts / max(counts.sum(), 1)).tolist()
    return hists


def sweep_point(logits: np.ndarray, exit_index: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    point = {"mean_exit_depth": float(exit_index.mean() + 1)}
    if labels is not None:
        point["accuracy"] = float((logits.argmax(-1) == labels).mean())
    return point
