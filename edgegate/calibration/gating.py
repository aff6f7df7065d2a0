"""Which gating the calibration forward runs under: deployed, augmented for coverage, or naive.

Stage: calibration (DESIGN §5 "Coverage"). Input: a model's gate modules (:class:`GatedParts`) and
calibration inputs. Output: context managers that temporarily change the gating (always restored,
also on error) and the coverage augmentation plan with its :class:`Augmentation` records.

* Deployed: nothing changes; every quantizer sees what reaches it at inference.
* Augmented (gate-aware, calibration only): exit thresholds raised so that at least ``min_coverage``
  samples reach each stage; MoE routing widened from top-k to top-k' so that each expert gets at least
  ``min_coverage`` tokens. The extra routes carry weight 0, so the block output (and everything
  downstream of it) is exactly the deployed one; only the under-covered experts see more tokens.
  ACM learner counts likewise widened from k to k + s per token, the extra learners at weight 0.
* Naive (baseline): no sample exits (every stage and head sees every sample, as ``forward_all``),
  MoE blocks dispatch densely (every expert sees every token) and every ACM learner runs on every
  token (at weight 0 where the token does not use it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgegate.calibration.probe import GatedParts, Probe, exit_scores
from edgegate.calibration.record import Augmentation
from edgegate.data import Inputs


@contextlib.contextmanager
def exit_thresholds(parts: GatedParts, values: dict[str, list[float]]) -> Iterator[None]:
    """Set the thresholds of the named early-exit nets for the duration."""
    saved = {p: parts.exits[p].thresholds.clone() for p in values}
    try:
        for p, v in values.items():
            parts.exits[p].set_thresholds(v)
        yield
    finally:
        for p, v in saved.items():
            parts.exits[p].set_thresholds(v)


@contextlib.contextmanager
def dense_dispatch(parts: GatedParts) -> Iterator[None]:
    saved = {p: moe.dispatch for p, moe in parts.moes.items()}
    try:
        for moe in parts.moes.values():
            moe.dispatch = "dense"
        yield
    finally:
        for p, mode in saved.items():
            parts.moes[p].dispatch = mode


def _choice_scores(router: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the router's top-k ranks, from its input: logits from ``proj``'s weights directly, so that a
    quantized router's input quantizer sees nothing extra."""
    return router.choice_scores(F.linear(x, router.proj.weight, router.proj.bias))


def _widen(k_wide: int):
    def hook(router: nn.Module, args: tuple, out: tuple[torch.Tensor, torch.Tensor]):
        weights, indices = out
        extra = k_wide - indices.shape[1]
        if extra <= 0:
            return None
        # The router's own choice scores, without calling proj (that would feed its quantizer twice).
        scores = _choice_scores(router, args[0])
        scores = scores.scatter(1, indices, float("-inf"))  # the deployed slots stay first and unchanged
        more = torch.topk(scores, extra, dim=-1).indices
        return (torch.cat([weights, weights.new_zeros(weights.shape[0], extra)], dim=1),
                torch.cat([indices, more], dim=1))
    return hook


@contextlib.contextmanager
def widened_routing(parts: GatedParts, k_wide: dict[str, int]) -> Iterator[None]:
    """Route each token of the named routers to ``k'`` slots: the deployed top-k with their weights,
    plus the next ``k' - k`` slots with weight 0 (calibration coverage only; outputs unchanged)."""
    handles = [parts.routers[p].register_forward_hook(_widen(k)) for p, k in k_wide.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def widened_learners(parts: GatedParts, extra: dict[str, int]) -> Iterator[None]:
    """Each token of the named ACMs also runs its next ``extra`` learners, at weight 0 (calibration
    coverage only; outputs unchanged)."""
    saved = {p: parts.acms[p].coverage_extra for p in extra}
    try:
        for p, s in extra.items():
            parts.acms[p].coverage_extra = s
        yield
    finally:
        for p, s in saved.items():
            parts.acms[p].coverage_extra = s


@contextlib.contextmanager
def naive_gating(parts: GatedParts) -> Iterator[None]:
    """The gate-unaware baseline: no early exit (threshold +inf never fires), dense MoE dispatch, every
    ACM learner on every token."""
    never = {p: [float("inf")] * (net.n_exits - 1) for p, net in parts.exits.items()}
    every = {p: acm.n_learners for p, acm in parts.acms.items()}
    with exit_thresholds(parts, never), dense_dispatch(parts), widened_learners(parts, every):
        yield


@contextlib.contextmanager
def augmented_gating(parts: GatedParts, thresholds: dict[str, list[float]], k_wide: dict[str, int],
                     extra: dict[str, int] | None = None) -> Iterator[None]:
    with exit_thresholds(parts, thresholds), widened_routing(parts, k_wide), widened_learners(parts, extra or {}):
        yield


# --------------------------------------------------------------------------------- coverage planning


def _just_above(value: float) -> float:
    return float(np.nextafter(np.float32(value), np.float32(np.inf)))


def augment_exits(model: nn.Module, x: Inputs, parts: GatedParts,
                  min_coverage: int) -> tuple[dict[str, list[float]], list[Augmentation]]:
    """Raise exit thresholds, exit by exit, just enough that ``min(min_coverage, reaching)`` samples
    continue past each exit. (DESIGN §5 says "lower"; a sample continues when its score is *below*
    the threshold, so it is raising a threshold that sends more samples on.) Raising the earliest
    needed threshold minimally adds the least confident of the exiting samples: the ones most like
    the population the next stage serves."""
    thresholds = {p: [float(t) for t in net.thresholds] for p, net in parts.exits.items()}
    records: list[Augmentation] = []
    depth = max((net.n_exits for net in parts.exits.values()), default=1)
    for k in range(depth - 1):
        with exit_thresholds(parts, thresholds):
            scored = exit_scores(model, x, parts, k)
        for path, scores in scored.items():
            need = min(min_coverage, len(scores))
            going_on = int((scores < thresholds[path][k]).sum())
            if going_on >= need:
                continue
            new = _just_above(np.sort(scores)[need - 1])
            records.append(Augmentation(gate=path, kind="exit_threshold", index=k, before=thresholds[path][k],
                                        after=new, rows_before=going_on, rows_after=int((scores < new).sum())))
            thresholds[path][k] = new
    changed = {r.gate for r in records}
    return {p: v for p, v in thresholds.items() if p in changed}, records


def _slot_layers(moe: nn.Module, quantized: set[str], moe_path: str) -> dict[int, list[str]]:
    """Quantized layers per router slot: an FFN expert's w1/w3/w2; const_mix for each constant slot."""
    prefix = f"{moe_path}." if moe_path else ""
    out: dict[int, list[str]] = {}
    for e in range(moe.n_experts):
        out[e] = [p for p in quantized if p.startswith(f"{prefix}experts.{e}.")]
    if moe.n_const and f"{prefix}const_mix" in quantized:
        first = moe.n_experts + moe.n_zero + moe.n_copy
        for c in range(moe.n_const):
            out[first + c] = [f"{prefix}const_mix"]
    return {s: layers for s, layers in out.items() if layers}


def _rows_per_slot(indices: torch.Tensor, moe: nn.Module) -> dict[int, int]:
    """Rows each slot's layers would see: tokens routed to the slot; const_mix runs once per token
    routed to any constant slot."""
    counts = torch.bincount(indices.reshape(-1), minlength=moe.n_slots)
    rows = {s: int(c) for s, c in enumerate(counts)}
    if moe.n_const:
        first = moe.n_experts + moe.n_zero + moe.n_copy
        any_const = int((indices >= first).any(dim=1).sum())
        rows.update({first + c: any_const for c in range(moe.n_const)})
    return rows


def _probed(model: nn.Module, x: Inputs, parts: GatedParts, thresholds: dict[str, list[float]],
            **keep: bool) -> Probe:
    """A probe of one forward of ``x`` under the calibration gating (exit ``thresholds``), keeping what ``keep``
    asks for (``Probe``'s ``keep_*`` flags)."""
    with exit_thresholds(parts, thresholds), Probe(model, [], parts, **keep) as probe:
        x.run(model)
    return probe


def augment_routing(model: nn.Module, x: Inputs, parts: GatedParts, thresholds: dict[str, list[float]],
                    quantized: set[str], min_coverage: int) -> tuple[dict[str, int], list[Augmentation]]:
    """Smallest k' >= k (up to every slot) giving each quantized expert ``min(min_coverage, tokens)``
    tokens, per router, under the (already exit-augmented) calibration gating."""
    if not parts.routers:
        return {}, []
    probe = _probed(model, x, parts, thresholds, keep_router_inputs=True)
    k_wide: dict[str, int] = {}
    records: list[Augmentation] = []
    for path, router in parts.routers.items():
        moe_path = parts.moe_of_router[path]
        moe = parts.moes[moe_path]
        slots = _slot_layers(moe, quantized, moe_path)
        tokens = probe.router_input(path)
        if not slots or not len(tokens):
            continue
        order = torch.topk(_choice_scores(router, tokens), router.n_experts, dim=-1).indices  # every slot, best first
        need = min(min_coverage, len(tokens))
        deployed = _rows_per_slot(order[:, :router.k], moe)
        short = {s: deployed[s] for s in slots if deployed[s] < need}
        if not short:
            continue
        k, rows = router.k, deployed
        while k < router.n_experts and any(rows[s] < need for s in slots):
            k += 1
            rows = _rows_per_slot(order[:, :k], moe)
        k_wide[path] = k
        records.append(Augmentation(gate=path, kind="top_k", index=None, before=float(router.k), after=float(k),
                                    rows_before=min(short.values()), rows_after=min(rows[s] for s in slots)))
    return k_wide, records


def augment_learners(model: nn.Module, x: Inputs, parts: GatedParts, thresholds: dict[str, list[float]],
                     quantized: set[str], min_coverage: int) -> tuple[dict[str, int], list[Augmentation]]:
    """Smallest widening s >= 0 per ACM giving each quantized learner ``min(min_coverage, tokens)`` tokens:
    learner i then also sees the tokens with k <= i < k + s, those fewest learners short of using it
    (the population most like the one it serves), under the (already exit-augmented) calibration gating."""
    if not parts.acms:
        return {}, []
    probe = _probed(model, x, parts, thresholds, keep_acm_counts=True)
    extra, records = {}, []  # widening per ACM path, what was widened
    for path, acm in parts.acms.items():
        prefix = f"{path}." if path else ""
        used = [i for i in range(acm.n_learners) if any(p.startswith(f"{prefix}learners.{i}.") for p in quantized)]
        k = probe.acm_counts(path)
        if not used or not len(k):
            continue
        need = min(min_coverage, len(k))

        def fewest(s: int) -> int:
            return min(int((k + s > i).sum()) for i in used)  # noqa: B023 (used now, in this iteration)

        s = 0
        while s < acm.n_learners and fewest(s) < need:
            s += 1
        if s:
            extra[path] = s
            records.append(Augmentation(gate=path, kind="learner_count", index=None, before=0.0, after=float(s),
                                        rows_before=fewest(0), rows_after=fewest(s)))
    return extra, records
