"""Early exit as real control flow: the batch-1 form with nested ``torch.cond`` (ONNX ``If``).

Input: an ``EarlyExitNet`` (``stages``, ``heads``, ``thresholds``, ``decide(k, logits)``).
Output: a module whose forward runs stage k, asks the exit decision, and only then enters stage k+1
inside the false branch, so a runtime that executes ``If`` lazily (ONNX Runtime, TensorRT) skips
the later stages' compute for samples that leave early. The batch>1 form is the net's own eval
forward, which compacts the batch (exited samples are dropped before the next stage).
"""

from __future__ import annotations

import torch
from torch import nn


class CondEarlyExit(nn.Module):
    """Nested ``If`` export form. Valid for batch 1 only (the branch is taken for the whole batch)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._from(0, x)

    def _from(self, k: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.net
        h = net.stages[k](h)
        logits = net.heads[k](h)
        last = len(net.stages) - 1
        if k == last:
            return logits, torch.full((h.shape[0],), k, dtype=torch.int64)
        leave = net.decide(k, logits).all()

        def take_exit(h: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # clone(): a cond branch may not return its input aliased.
            return logits.clone(), torch.full((logits.shape[0],), k, dtype=torch.int64)

        def go_on(h: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self._from(k + 1, h)

        return torch.cond(leave, take_exit, go_on, (h, logits))
