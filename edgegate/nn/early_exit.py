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

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from edgegate.errors import EdgegateError
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
                 thresholds: Sequence[float] | torch.Tensor, policy: str = "maxprob") -> None:
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
            self.exit_gates = nn.ModuleList(exit_gate_mlp() for _ in range(len(stages) - 1))
        self.last_decision: torch.Tensor | None = None

    @property
    def n_exits(self) -> int:
        return len(self.stages)

    def get_config(self) -> dict[str, Any]:
        raise EdgegateError(f"{type(self).__name__} was built from modules and has no JSON config; build it "
                            "with a subclass that has one (e.g. edgegate.nn.ExitMLP) to save it")

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
