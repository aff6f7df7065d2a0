"""Observing the gated forward: what reaches each layer, stage and expert, and the exit scores.

Stage: calibration (DESIGN §5, "Path-conditional statistics" and "Coverage"). Input: a model in
eval mode and the paths of its quantized layers and gates. Output: row counts per layer (samples
for convs, tokens for linears), per early-exit stage, per router slot and per ACM learner, and on
request the head logits of each exit, the routers' inputs and each ACM's learner counts. Hooks only:
the model runs its own eager forward, so what is counted is exactly what the deployed gating
computes (EarlyExitNet compaction, MoE sparse dispatch, ACM per-learner compaction).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np
import torch
from torch import nn

from edgegate import nn as enn
from edgegate.data import Inputs
from edgegate.gates import GateMap, Observe, family_of


@dataclass(frozen=True)
class GatedParts:
    """The gate modules calibration drives, by path: early-exit nets, MoE blocks and their routers, ACMs."""

    exits: dict[str, enn.EarlyExitNet]
    moes: dict[str, enn.MoE]  # MoE path -> module
    routers: dict[str, enn.TopKRouter]  # router path -> module (routers of MoE blocks only)
    moe_of_router: dict[str, str]
    acms: dict[str, enn.ACM] = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module, gate_map: GateMap) -> GatedParts:
        """The parts whose gate family observes exits, routes or learners (``edgegate.gates.Observe``)."""
        exits, moes, routers, moe_of, acms = {}, {}, {}, {}, {}
        for info in gate_map:
            module = model.get_submodule(info.name)
            family = family_of(module)
            observe = family.observe if family is not None else None
            if observe is Observe.EXITS and isinstance(module, enn.EarlyExitNet):
                exits[info.name] = module
            elif observe is Observe.ROUTES and "moe" in info.details:
                moe = model.get_submodule(info.details["moe"])
                if isinstance(moe, enn.MoE):  # a bare router has no dispatch of its own to condition on
                    moes[info.details["moe"]], routers[info.name] = moe, module
                    moe_of[info.name] = info.details["moe"]
            elif observe is Observe.LEARNERS and isinstance(module, enn.ACM):
                acms[info.name] = module
        return cls(exits, moes, routers, moe_of, acms)


def rows_of(module: nn.Module, x: torch.Tensor) -> int:
    """Calibration rows in a layer input: samples for a conv, tokens (all leading dims) for a linear."""
    if x.numel() == 0:
        return 0
    if isinstance(module, nn.Conv2d):
        return int(x.shape[0]) if x.dim() == 4 else 1
    return int(x.numel() // x.shape[-1])


def exit_score(net: enn.EarlyExitNet, k: int, logits: torch.Tensor) -> torch.Tensor:
    """The score exit ``k`` compares with ``thresholds[k]`` (fp32 [B]): ``decide(k) == score >= tau``.

    Mirrors the ``ExitDecision`` / ``LearnedExitDecision`` op bodies (softmax / sigmoid in fp32).
    """
    if net.policy == "maxprob":
        return torch.softmax(logits.float(), dim=-1).amax(dim=-1)
    return torch.sigmoid(net.gate_logit(k, logits).float())


def exit_scores(model: nn.Module, x: Inputs, parts: GatedParts, k: int) -> dict[str, np.ndarray]:
    """One no-grad forward of ``x``: per early-exit net with an exit ``k`` before its last, the exit-``k`` score
    of each row that reaches exit ``k`` under the gating in force."""
    with torch.no_grad(), Probe(model, [], parts, keep_heads=True) as probe:
        x.run(model)
    return {path: exit_score(net, k, probe.heads(path, k)).cpu().numpy()
            for path, net in parts.exits.items() if k < net.n_exits - 1}


class Probe:
    """Context manager: forward hooks counting rows per layer / stage / slot over every forward run
    inside it. ``keep_heads``: also keep each exit head's logits (the samples that reached it);
    ``keep_router_inputs``: also keep each MoE router's input tokens; ``keep_inputs``: layer paths
    whose inputs are kept (to calibrate them directly); ``keep_acm_counts``: also keep each ACM's learner
    count per token. ``learner_rows`` counts the tokens each ACM learner ran on."""

    def __init__(self, model: nn.Module, layers: Iterable[str], parts: GatedParts, *, keep_heads: bool = False,
                 keep_router_inputs: bool = False, keep_inputs: Iterable[str] = (),
                 keep_acm_counts: bool = False) -> None:
        self.model, self.parts = model, parts
        self.layer_paths = list(layers)
        self.keep_heads, self.keep_router_inputs = keep_heads, keep_router_inputs
        self.keep_inputs = set(keep_inputs)
        self.rows: dict[str, int] = dict.fromkeys(self.layer_paths, 0)
        self.stage_rows = {p: [0] * net.n_exits for p, net in parts.exits.items()}
        self.slot_rows = {parts.moe_of_router[p]: [0] * r.n_experts for p, r in parts.routers.items()}
        self.head_logits: dict[str, list[list[torch.Tensor]]] = {p: [[] for _ in net.heads]
                                                                 for p, net in parts.exits.items()}
        self.exit_index: dict[str, list[torch.Tensor]] = {p: [] for p in parts.exits}
        self.router_inputs: dict[str, list[torch.Tensor]] = {p: [] for p in parts.routers}
        self.inputs: dict[str, list[torch.Tensor]] = {p: [] for p in self.keep_inputs}
        self.keep_acm_counts = keep_acm_counts
        self.learner_rows = {p: [0] * acm.n_learners for p, acm in parts.acms.items()}
        self.counts: dict[str, list[torch.Tensor]] = {p: [] for p in parts.acms}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # --------------------------------------------------------------------------------------- hooks

    def _layer_hook(self, path: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self.rows[path] += rows_of(module, args[0])
            if path in self.keep_inputs and args[0].numel():
                self.inputs[path].append(args[0].detach())
        return hook

    @staticmethod
    def _count_hook(counts: list[int], i: int):
        """Adds the rows (samples or tokens, the leading dim) of each input to ``counts[i]``."""
        def hook(module: nn.Module, args: tuple) -> None:
            counts[i] += int(args[0].shape[0])
        return hook

    def _head_hook(self, path: str, k: int):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            self.head_logits[path][k].append(out.detach())
        return hook

    def _exit_hook(self, path: str):
        def hook(module: nn.Module, args: tuple, out: object) -> None:
            if isinstance(out, tuple):  # eval forward: (logits, exit_index)
                self.exit_index[path].append(out[1].detach())
        return hook

    def _router_hook(self, path: str):
        moe = self.parts.moe_of_router[path]

        def hook(module: enn.TopKRouter, args: tuple, out: tuple[torch.Tensor, torch.Tensor]) -> None:
            routed = module.mark_skipped(*out)  # slots the router skipped reach no expert
            counts = torch.bincount(routed[routed >= 0], minlength=module.n_experts)
            self.slot_rows[moe] = [a + int(b) for a, b in zip(self.slot_rows[moe], counts, strict=True)]
            if self.keep_router_inputs:
                self.router_inputs[path].append(args[0].detach())
        return hook

    def _acm_hook(self, path: str):
        def hook(module: enn.ACM, args: tuple, out: object) -> None:
            if module.last_decision is not None:  # eval forward: the counts it chose
                self.counts[path].append(module.last_decision)
        return hook

    def __enter__(self) -> Probe:
        add = self._handles.append
        for path in self.layer_paths:
            add(self.model.get_submodule(path).register_forward_pre_hook(self._layer_hook(path)))
        for path, net in self.parts.exits.items():
            for k, stage in enumerate(net.stages):
                add(stage.register_forward_pre_hook(self._count_hook(self.stage_rows[path], k)))
            if self.keep_heads:
                for k, head in enumerate(net.heads):
                    add(head.register_forward_hook(self._head_hook(path, k)))
            add(net.register_forward_hook(self._exit_hook(path)))
        for path, router in self.parts.routers.items():
            add(router.register_forward_hook(self._router_hook(path)))
        for path, acm in self.parts.acms.items():
            for i, learner in enumerate(acm.learners):
                add(learner.register_forward_pre_hook(self._count_hook(self.learner_rows[path], i)))
            if self.keep_acm_counts:
                add(acm.register_forward_hook(self._acm_hook(path)))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------------------------------- results

    def heads(self, path: str, k: int) -> torch.Tensor:
        """Logits of exit head ``k`` of net ``path`` over every forward (rows that reached it)."""
        return torch.cat(self.head_logits[path][k]) if self.head_logits[path][k] else torch.zeros(0, 1)

    def exits(self, path: str) -> torch.Tensor:
        return torch.cat(self.exit_index[path]) if self.exit_index[path] else torch.zeros(0, dtype=torch.int64)

    def layer_input(self, path: str) -> torch.Tensor | None:
        return torch.cat(self.inputs[path]) if self.inputs.get(path) else None

    def router_input(self, path: str) -> torch.Tensor:
        return torch.cat(self.router_inputs[path])

    def acm_counts(self, path: str) -> torch.Tensor:
        """The learner count of every token ACM ``path`` saw (int64 [T])."""
        return torch.cat(self.counts[path]) if self.counts[path] else torch.zeros(0, dtype=torch.int64)
