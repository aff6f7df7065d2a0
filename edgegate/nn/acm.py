"""Adaptive Computation Modules (ACM, Wójcik et al. 2023): a block replaced by N small learners, of which
a per-token gate runs the first k.

Stage: model family (``edgegate.nn``). Input: tokens ``x`` [..., d_model] (leading dims are flattened to
rows and restored). Output: ``sum_{i<k_t} learner_i(x_t)`` per token t, same shape as ``x``; k_t = 0 gives
zero, so the module belongs in a residual branch (``h + acm(h)``). The gate is a small network with N+1
logits; at inference k = argmax (the ``LearnerCount`` op, so the exported graph keeps the gate by name).

Eval forms, the same function (tested):

* *compaction* (default): learner i runs only on the tokens with k > i (``nonzero`` -> gather -> learner
  -> scatter-add), so unused learners cost nothing at any batch size and eager calibration sees exactly
  the tokens that use each learner;
* *If* (export of a single static token, i.e. ``--batch 1``): nested ``torch.cond`` -> ONNX ``If``, learner
  i+1 sits in the branch taken when k > i, so a runtime that runs ``If`` lazily never touches it.

Training (``train_mode``): ``nested`` draws k per token uniformly from {0..N} (nested dropout: every prefix
of learners learns to be a usable block), ``gumbel`` samples k from the gate with hard Gumbel-softmax
(straight-through) and sets ``compute_loss`` = E[k]/N under the gate's probabilities, to be added to the
task loss with a weight. ``fixed_k`` (any mode) makes every token run that many learners: the
"all learners" reference is ``fixed_k = n_learners``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgegate.errors import EdgegateError
from edgegate.gates import GateFamily, GateInfo, GateKind, Observe, register_family
from edgegate.nn._record import exporting, record
from edgegate.nn.moe import Activation
from edgegate.ops import torch_ops as ops


class ACMTraining(StrEnum):
    NESTED = "nested"  # k ~ U{0..N} per token: learners become an ordered refinement
    GUMBEL = "gumbel"  # k from the gate, hard Gumbel-softmax with straight-through gradients


class ACMForm(StrEnum):
    AUTO = "auto"  # If when an export traces a single static token, compaction otherwise
    IF = "if"
    COMPACT = "compact"


_ACTIVATIONS: dict[Activation, type[nn.Module]] = {Activation.GELU: nn.GELU, Activation.RELU: nn.ReLU,
                                                   Activation.SILU: nn.SiLU}


def learner(d_model: int, d_hidden: int, act: Activation = Activation.GELU) -> nn.Module:
    """One learner: a two-layer MLP d_model -> d_hidden -> d_model (GELU in the ACM paper)."""
    return nn.Sequential(nn.Linear(d_model, d_hidden), _ACTIVATIONS[act](), nn.Linear(d_hidden, d_model))


class ACM(nn.Module):
    """N learners and a gate choosing k in {0..N} per token; ``last_decision`` (eval) = k int64 [T].

    ``gate_hidden > 0`` makes the gate Linear -> ReLU -> Linear (else one Linear), N+1 logits. ``act``: the
    learners' activation ("gelu", "relu" or "silu").
    ``coverage_extra`` (calibration only, see ``edgegate.calibration.gating``): each token also runs the
    next ``coverage_extra`` learners with weight 0, so quantizers of rarely used learners see more rows
    while the output stays exactly the deployed one.
    """

    def __init__(self, d_model: int, n_learners: int, d_hidden: int, gate_hidden: int = 0, act: str = "gelu") -> None:
        super().__init__()
        if n_learners < 1 or d_hidden < 1 or gate_hidden < 0:
            raise EdgegateError(f"ACM: needs n_learners >= 1, d_hidden >= 1 and gate_hidden >= 0, got "
                                f"{n_learners=}, {d_hidden=}, {gate_hidden=}")
        self.d_model, self.n_learners, self.d_hidden, self.gate_hidden = d_model, n_learners, d_hidden, gate_hidden
        if act not in {str(a) for a in _ACTIVATIONS}:
            raise EdgegateError(f"ACM: act={act!r} is unknown; use one of {', '.join(map(str, _ACTIVATIONS))}")
        self.act = Activation(act)
        self.learners = nn.ModuleList(learner(d_model, d_hidden, self.act) for _ in range(n_learners))
        self.gate = (nn.Sequential(nn.Linear(d_model, gate_hidden), nn.ReLU(), nn.Linear(gate_hidden, n_learners + 1))
                     if gate_hidden else nn.Linear(d_model, n_learners + 1))
        # Not part of the config: how the module is being trained / exported / calibrated right now.
        self.train_mode = ACMTraining.NESTED
        self.temperature = 1.0
        self.fixed_k: int | None = None
        self.form = ACMForm.AUTO
        self.coverage_extra = 0
        self.compute_loss: torch.Tensor | None = None
        self.last_decision: torch.Tensor | None = None

    def get_config(self) -> dict[str, Any]:
        return {"d_model": self.d_model, "n_learners": self.n_learners, "d_hidden": self.d_hidden,
                "gate_hidden": self.gate_hidden, "act": str(self.act)}

    def train(self, mode: bool = True) -> ACM:
        # The training loss holds an autograd graph; drop it so eval models deep-copy and pickle.
        self.compute_loss = None
        return super().train(mode)

    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The gate's N+1 logits per token [T, N+1] (rows of ``x`` [T, d_model])."""
        return self.gate(x)

    def counts(self, x: torch.Tensor) -> torch.Tensor:
        """k per token, int64 [T]: the gate's argmax, or ``fixed_k`` for every token."""
        if self.fixed_k is not None:
            return torch.full((x.shape[0],), int(self.fixed_k), dtype=torch.int64, device=x.device)
        return ops.learner_count(self.gate_logits(x))

    def forward(self, x: torch.Tensor, return_counts: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``y``, or with ``return_counts`` ``(y, k)``: k per token, int64 over ``x``'s leading dims."""
        shape = x.shape
        x = x.reshape(-1, self.d_model)
        if self.training:
            y, k = self._forward_train(x)
        else:
            k = self.counts(x)
            y = self._forward_if(x, k) if self._use_if(x) else self._forward_compact(x, k)
            if not exporting():
                record(self, last_decision=k)
        y = y.reshape(shape)
        return (y, k.reshape(shape[:-1])) if return_counts else y

    def forward_counted(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, k)`` through ``__call__``, so hooks on the module (calibration, fidelity) see the call."""
        return self(x, return_counts=True)

    def forward_dense(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Every learner on every token, masked by ``k`` [T] (the reference the sparse forms are tested on)."""
        active = (torch.arange(self.n_learners, device=x.device) < k.unsqueeze(-1)).to(x.dtype)  # [T, N]
        outs = torch.stack([m(x) for m in self.learners], dim=1)  # [T, N, d]
        return (active.unsqueeze(-1) * outs).sum(dim=1)

    # ------------------------------------------------------------------------------------------ training

    @torch.no_grad()
    def count_labels(self, x: torch.Tensor, tolerance: float) -> torch.Tensor:
        """Gate targets [T] (the ACM paper's gate pre-training): per token, the smallest k whose output is
        within ``tolerance`` of all N learners' output, as relative squared error ||y_k - y_N||^2 / ||y_N||^2."""
        x = x.reshape(-1, self.d_model)
        outs = torch.stack([m(x) for m in self.learners], dim=1)  # [T, N, d]
        prefix = torch.cat([outs.new_zeros(x.shape[0], 1, self.d_model), outs.cumsum(dim=1)], dim=1)  # y_0..y_N
        full = prefix[:, -1:]
        err = (prefix - full).square().sum(-1) / full.square().sum(-1).clamp_min(1e-12)  # [T, N+1]
        return (err <= tolerance).to(torch.int64).argmax(dim=-1)  # k = N always qualifies (error 0)

    def _forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.n_learners
        if self.fixed_k is not None or self.train_mode is ACMTraining.NESTED:
            k = (self.counts(x) if self.fixed_k is not None
                 else torch.randint(0, n + 1, (x.shape[0],), device=x.device))
            return self.forward_dense(x, k), k
        logits = self.gate_logits(x)
        choice = F.gumbel_softmax(logits, tau=self.temperature, hard=True)  # one-hot over k, ST gradients
        active = 1.0 - torch.cumsum(choice, dim=-1)[:, :n]  # learner i runs when k > i
        outs = torch.stack([m(x) for m in self.learners], dim=1)
        probs = torch.softmax(logits, dim=-1)
        self.compute_loss = (probs * torch.arange(n + 1, device=x.device, dtype=probs.dtype)).sum(-1).mean() / n
        return (active.unsqueeze(-1) * outs).sum(dim=1), choice.argmax(-1)

    # -------------------------------------------------------------------------------------------- eval

    def _use_if(self, x: torch.Tensor) -> bool:
        if self.form is ACMForm.COMPACT or not exporting():
            return False
        single = isinstance(x.shape[0], int) and x.shape[0] == 1  # a static size; a dynamic batch is a SymInt
        if self.form is ACMForm.IF and not single:
            raise EdgegateError("ACM: the If form runs one token per call; export with --batch 1 (one token per "
                                "sample) or use form='compact'")
        return single

    def _forward_compact(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Learner i on the tokens with k > i only (plus ``coverage_extra`` widening, at weight 0)."""
        y = x.new_zeros(x.shape)
        reach = k + self.coverage_extra if self.coverage_extra else k
        for i, m in enumerate(self.learners):
            rows = torch.nonzero(reach > i).squeeze(1)
            if not exporting() and rows.numel() == 0:
                break  # counts are nested: no later learner has rows either (eager only: export keeps shapes)
            out = m(x[rows])
            if self.coverage_extra:  # widened rows are computed (calibration) but add nothing
                out = out * (k[rows] > i).unsqueeze(-1).to(out.dtype)
            y = y.index_put((rows,), y[rows] + out)
        return y

    def _forward_if(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Nested ``torch.cond`` (ONNX ``If``): learner i runs inside the branch taken when k > i."""
        return self._from(0, x, k, x.new_zeros(x.shape))

    def _from(self, i: int, x: torch.Tensor, k: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if i == self.n_learners:
            return y

        def run(x: torch.Tensor, k: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self._from(i + 1, x, k, y + self.learners[i](x))

        def stop(x: torch.Tensor, k: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return y.clone()  # a cond branch may not return its input aliased

        return torch.cond((k > i).all(), run, stop, (x, k, y))


def _gate_layers(acm: ACM, info: GateInfo, model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(layer, f"learner-count gate of {info.name or 'the model'}") for layer in acm.gate.modules()]


register_family(ACM, GateFamily(
    GateKind.LEARNERS, Observe.LEARNERS,
    details=lambda m: {"n_learners": m.n_learners, "d_hidden": m.d_hidden, "gate_hidden": m.gate_hidden},
    decision_layers=_gate_layers,
    summary="per-token count of learners run (LearnerCount; ONNX If at batch 1, per-learner compaction "
            "otherwise); the gate stays float"))
