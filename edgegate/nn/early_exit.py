"""Early-exit networks (confidence exits; JEI-DNN-style learned exit gates).

Stage: model family (``edgegate.nn``). Input: ``x`` [B, ...]. Output: in training, the logits of
every head (list of [B, C]); in eval, ``(logits [B, C], exit_index int64 [B])`` where each sample
leaves at the first head whose exit decision fires (the last head always exits).

Contract relied on by the exporter (``edgegate.onnx_export.early_exit``): ``stages`` and ``heads``
(``nn.ModuleList`` of equal length K), buffer ``thresholds`` (float32 [K-1]), ``policy``, and
``decide(k, logits) -> bool[B]``. The eval forward is the batch > 1 export form: samples that exited
are removed before the next stage (compaction) and their results are scattered back, so batched
inference also saves compute; it is ``torch.export``-able (data-dependent sizes via ``nonzero``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from edgegate.errors import EdgegateError
from edgegate.gates import GateFamily, GateInfo, GateKind, Observe, register_family
from edgegate.nn._record import exporting, record
from edgegate.ops import torch_ops as ops

POLICIES = ("maxprob", "learned")
N_EXIT_FEATURES = 3


def exit_gate_mlp(hidden: int = 16) -> nn.Module:
    """The tiny learned exit gate: exit features [B, 3] -> gate logit [B, 1]."""
    return nn.Sequential(nn.Linear(N_EXIT_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class EarlyExitNet(nn.Module):
    """K stages, one classifier head after each, and a per-exit policy.

    ``policy="maxprob"``: exit k fires when max softmax(logits_k) >= thresholds[k] (``ExitDecision``).
    ``policy="learned"``: exit k fires when sigmoid(exit_gates[k](exit_features(logits_k))) >=
    thresholds[k] (``LearnedExitDecision``). ``last_decision`` (eval) = exit_index [B].
    """

    input_names: tuple[str, ...] = ("x",)

    def __init__(self, stages: Sequence[nn.Module], heads: Sequence[nn.Module],
                 thresholds: Sequence[float] | torch.Tensor, policy: str = "maxprob",
                 exit_gates: Sequence[nn.Module] | None = None) -> None:
        super().__init__()
        if len(stages) != len(heads) or len(stages) < 1:
            raise EdgegateError(f"EarlyExitNet: needs as many heads as stages (>= 1), got {len(stages)} "
                                f"stages and {len(heads)} heads")
        if policy not in POLICIES:
            raise EdgegateError(f"EarlyExitNet: policy={policy!r} is unknown; use one of {POLICIES}")
        thr = torch.as_tensor(thresholds, dtype=torch.float32).reshape(-1).clone()
        if thr.numel() != len(stages) - 1:
            raise EdgegateError(f"EarlyExitNet: needs {len(stages) - 1} thresholds (one per exit but the "
                                f"last), got {thr.numel()}")
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self.policy = policy
        self.register_buffer("thresholds", thr)
        if policy == "learned":
            gates = [exit_gate_mlp() for _ in range(len(stages) - 1)] if exit_gates is None else list(exit_gates)
            if len(gates) != len(stages) - 1:
                raise EdgegateError(f"EarlyExitNet: needs {len(stages) - 1} exit gates (one per exit but the last), "
                                    f"got {len(gates)}")
            self.exit_gates = nn.ModuleList(gates)
        elif exit_gates is not None:
            raise EdgegateError("EarlyExitNet: exit_gates are for policy='learned'")
        self.last_decision: torch.Tensor | None = None

    @classmethod
    def wrap(cls, stages: Sequence[nn.Module], heads: Sequence[nn.Module], thresholds: Sequence[float],
             policy: str = "maxprob", exit_gates: Sequence[nn.Module] | None = None) -> EarlyExitNet:
        """An early-exit net made of a user's own, already trained modules, weights kept (no retraining).

        ``stages[k]`` maps the previous stage's output to its own (the first takes the model input) and
        ``heads[k]`` maps stage k's output to class logits [B, C]. Sample b leaves at exit k < K-1 when
        ``max softmax(heads[k](h))[b] >= thresholds[k]`` (``policy="maxprob"``), or, with ``policy="learned"``,
        when ``sigmoid(exit_gates[k](EarlyExitNet.exit_features(logits)))[b] >= thresholds[k]`` (the gates
        must be given: trained on "head k is right"). Stages must accept any batch size, since samples
        that leave are removed from the batch before the next stage (compaction).

        The result exports like a built-in early-exit net (ONNX ``If`` at batch 1, compaction otherwise),
        calibrates gate-aware and reports exit agreement. It has no JSON config: save it whole
        (``torch.save(net, path)``) and export it with ``--trust-model``, or pass it to ``edgegate.export``.
        """
        for what, parts in (("stages", stages), ("heads", heads), ("exit_gates", exit_gates or ())):
            bad = [i for i, m in enumerate(parts) if not isinstance(m, nn.Module)]
            if bad:
                raise EdgegateError(f"EarlyExitNet.wrap: {what}[{bad[0]}] is a {type(parts[bad[0]]).__name__}, not "
                                    "an nn.Module; pass the modules themselves")
        if policy == "learned" and exit_gates is None:
            raise EdgegateError("EarlyExitNet.wrap: policy='learned' needs the trained exit_gates; untrained gates "
                                "would decide at random (use policy='maxprob' to exit on head confidence)")
        return cls(list(stages), list(heads), thresholds, policy, exit_gates)

    @property
    def n_exits(self) -> int:
        return len(self.stages)

    def get_config(self) -> dict[str, Any]:
        raise EdgegateError(f"{type(self).__name__} was built from modules and has no JSON config: save it whole "
                            "with torch.save(net, path) and export that file with --trust-model, or pass the module "
                            "to edgegate.export; a subclass with get_config (e.g. edgegate.nn.ExitMLP) saves as a "
                            "checkpoint")

    def set_thresholds(self, values: Sequence[float]) -> None:
        """Replace the exit thresholds (e.g. after re-tuning on calibration data)."""
        new = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
        if new.numel() != self.thresholds.numel():
            raise EdgegateError(f"set_thresholds: expected {self.thresholds.numel()} thresholds, "
                                f"got {new.numel()}")
        with torch.no_grad():
            self.thresholds.copy_(new)

    @staticmethod
    def exit_features(logits: torch.Tensor) -> torch.Tensor:
        """JEI-DNN gate features of a head's logits: [max prob, entropy, top1 - top2 margin] -> [B, 3]."""
        p = torch.softmax(logits.float(), dim=-1)
        top2 = torch.topk(p, 2, dim=-1).values
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
        return torch.stack([top2[:, 0], entropy, top2[:, 0] - top2[:, 1]], dim=-1)

    def gate_logit(self, k: int, logits: torch.Tensor) -> torch.Tensor:
        """Learned policy: exit gate k's logit [B] (train it with BCE on "head k is right")."""
        return self.exit_gates[k](self.exit_features(logits)).squeeze(-1)

    def decide(self, k: int, logits: torch.Tensor) -> torch.Tensor:
        """Exit decision of head k (k < K-1) for each sample: bool [B]."""
        if self.policy == "maxprob":
            return ops.exit_decision(logits, self.thresholds[k])
        return ops.learned_exit_decision(self.gate_logit(k, logits), self.thresholds[k])

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every head on every sample (training and analysis; no exit)."""
        out = []
        for stage, head in zip(self.stages, self.heads, strict=True):
            x = stage(x)
            out.append(head(x))
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            return self.forward_all(x)
        return self.forward_exit(x)

    def forward_exit(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample early exit by compaction: ``(logits [B, C], exit_index int64 [B])``."""
        last = self.n_exits - 1
        rows = torch.arange(x.shape[0], device=x.device)  # original row of each still-running sample
        h = self.stages[0](x)
        logits = self.heads[0](h)
        out = logits.new_zeros(x.shape[0], logits.shape[-1])
        exit_index = torch.full((x.shape[0],), last, dtype=torch.int64, device=x.device)
        for k in range(last):
            leave = self.decide(k, logits)
            done = torch.nonzero(leave).squeeze(1)
            out = out.index_put((rows[done],), logits[done])
            exit_index = exit_index.index_put((rows[done],), torch.full_like(done, k))
            stay = torch.nonzero(~leave).squeeze(1)
            rows, h = rows[stay], h[stay]
            h = self.stages[k + 1](h)
            logits = self.heads[k + 1](h)
        out = out.index_put((rows,), logits)
        if not exporting():
            record(self, last_decision=exit_index)
        return out, exit_index


class ExitMLP(EarlyExitNet):
    """An ``EarlyExitNet`` of Linear+ReLU stages with linear heads, rebuildable from its config."""

    def __init__(self, in_features: int, hidden: int | Sequence[int], n_classes: int, n_stages: int = 3,
                 policy: str = "maxprob", thresholds: Sequence[float] | None = None) -> None:
        widths = [hidden] * n_stages if isinstance(hidden, int) else list(hidden)
        if len(widths) != n_stages:
            raise EdgegateError(f"ExitMLP: hidden has {len(widths)} widths for {n_stages} stages")
        dims = [in_features, *widths]
        stages = [nn.Sequential(nn.Linear(dims[i], dims[i + 1]), nn.ReLU()) for i in range(n_stages)]
        heads = [nn.Linear(w, n_classes) for w in widths]
        thr = [0.9] * (n_stages - 1) if thresholds is None else list(thresholds)
        super().__init__(stages, heads, thr, policy)
        self._config = {"in_features": in_features, "hidden": hidden if isinstance(hidden, int) else widths,
                        "n_classes": n_classes, "n_stages": n_stages, "policy": policy}

    def get_config(self) -> dict[str, Any]:
        # Thresholds live in the state_dict buffer too; the config carries the current values.
        return {**self._config, "thresholds": [float(t) for t in self.thresholds]}


def _exit_layers(net: EarlyExitNet, info: GateInfo, model: nn.Module) -> Iterator[tuple[nn.Module, str]]:
    # Every module of the heads and exit gates; the policy keeps the quantizable ones. Exit heads produce
    # both the exit score and the exited samples' logits; the last head is kept with them so every exit
    # is served alike.
    for k, head in enumerate(net.heads):
        for layer in head.modules():
            yield layer, f"exit head {k}"
    for k, gate in enumerate(getattr(net, "exit_gates", ())):
        for layer in gate.modules():
            yield layer, f"learned exit gate {k}"


register_family(EarlyExitNet, GateFamily(
    GateKind.EXIT, Observe.EXITS,
    details=lambda m: {"n_exits": m.n_exits, "policy": m.policy, "thresholds": [float(t) for t in m.thresholds]},
    decision_layers=_exit_layers,
    summary="per-sample exit after each stage (ExitDecision / LearnedExitDecision; ONNX If or compaction); "
            "exit heads and exit gates stay float"))
